import pytest
import torch

import threestudio_mv
from threestudio_mv.utils.camera import ray_box_intersection
from threestudio_mv.utils import camera
from threestudio_mv.utils.errors import UserError

SMALL_HASH = {"otype": "HashGrid", "n_levels": 8, "log2_hashmap_size": 14, "base_resolution": 8, "per_level_scale": 1.5}
# exp(160 (0.5 - r)) with a zero density MLP: density 1 on the sphere r = 0.5, e^8 times less 0.05 outside it.
CRISP_SPHERE = {"density_activation": "exp", "density_blob_scale": 80.0, "density_blob_std": 0.5}
# softplus(500 (1 - r / 0.5)): a converged-looking field, empty (< e^-5) from 0.005 outside the sphere.
CONVERGED_SPHERE = {"density_activation": "softplus", "density_blob_scale": 500.0, "density_blob_std": 0.5}


def make_cameras(size=16, azimuths=(0.0, 90.0, 180.0, 270.0), distance=2.5, elevation=15.0, fovy=40.0):
    n = len(azimuths)
    c2w = camera.c2w_from_spherical(torch.full((n,), elevation), torch.tensor(azimuths), torch.full((n,), distance))
    rays_o, rays_d = camera.get_rays(camera.camera_ray_directions(size, size, torch.full((n,), fovy)), c2w)
    return rays_o, rays_d, c2w[:, :3, 3]


def make_renderer(geometry=None, material="no-material", background=None, zero_density_mlp=False, **config):
    if geometry is None:
        geometry = {}
    geometry = threestudio_mv.find("implicit-volume")({"pos_encoding_config": SMALL_HASH, **geometry})
    if zero_density_mlp:
        with torch.no_grad():
            for parameter in geometry.density_network.parameters():
                parameter.zero_()
    material = threestudio_mv.find(material)({})
    background = threestudio_mv.find("solid-color")(background or {})
    renderer = threestudio_mv.find("nerf-volume-renderer")(
        config, geometry=geometry, material=material, background=background
    )
    return renderer, geometry


def set_mode(renderer, training):
    for module in (renderer, renderer.geometry, renderer.material, renderer.background):
        module.train(training)


def sphere_hit_distance(rays_o, rays_d, radius):
    """Analytic first intersection of unit rays with the sphere |x| = radius (nan on a miss)."""
    b = (rays_o * rays_d).sum(-1)
    c = (rays_o * rays_o).sum(-1) - radius**2
    disc = b * b - c
    return torch.where(disc > 0, -b - disc.clamp(min=0).sqrt(), torch.full_like(b, float("nan")))


def test_ray_box_intersection():
    rays_o = torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    rays_d = torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    near, far, hit = ray_box_intersection(rays_o, rays_d, -1.0, 1.0)
    assert hit.tolist() == [True, False, True]
    torch.testing.assert_close(near, torch.tensor([2.0, 0.0, 0.0]))
    torch.testing.assert_close(far, torch.tensor([4.0, 0.0, 1.0]))


def test_output_shapes_and_training_samples():
    renderer, geometry = make_renderer({"normal_type": "finite_difference"}, num_samples_per_ray=32)
    rays_o, rays_d, lights = make_cameras(size=8)
    out = renderer(rays_o, rays_d, lights)
    for key, channels in [("comp_rgb", 3), ("comp_rgb_fg", 3), ("comp_rgb_bg", 3), ("opacity", 1), ("depth", 1),
                          ("z_variance", 1)]:
        assert out[key].shape == (4, 8, 8, channels), key
    n_samples = out["weights"].shape[0]
    assert n_samples > 0 and "comp_normal" not in out
    for key, channels in [("points", 3), ("density", 1), ("t_dirs", 3), ("normal", 3)]:
        assert out[key].shape == (n_samples, channels), key
    per_ray = torch.zeros(4 * 8 * 8).index_add(0, out["ray_indices"], out["weights"][:, 0])
    torch.testing.assert_close(per_ray, out["opacity"].reshape(-1))
    torch.testing.assert_close(out["comp_rgb"], out["comp_rgb_fg"] + out["comp_rgb_bg"] * (1 - out["opacity"]))


def test_opacity_is_zero_for_empty_rays_and_one_through_a_dense_blob():
    renderer, _ = make_renderer(CRISP_SPHERE, zero_density_mlp=True, background={"color": [0.0, 0.0, 1.0]})
    set_mode(renderer, False)
    rays_o, rays_d, lights = make_cameras()
    out = renderer(rays_o, rays_d, lights)
    assert out["opacity"][:, 7:9, 7:9].min() > 0.999  # through the centre of the sphere
    away_o, away_d, _ = make_cameras(size=4)
    out = renderer(away_o, -away_d, lights)  # looking away from the box: the rays miss it
    assert out["opacity"].abs().max() == 0
    torch.testing.assert_close(out["comp_rgb"], torch.tensor([0.0, 0.0, 1.0]).expand(4, 4, 4, 3))

    empty, _ = make_renderer({"density_bias": -20.0}, zero_density_mlp=True)
    set_mode(empty, False)
    assert empty(rays_o, rays_d, lights)["opacity"].max() < 1e-4


def test_depth_of_a_known_sphere():
    renderer, _ = make_renderer(CRISP_SPHERE, zero_density_mlp=True, num_samples_per_ray=128)
    set_mode(renderer, False)
    rays_o, rays_d, lights = make_cameras()
    out = renderer(rays_o, rays_d, lights)
    expected = sphere_hit_distance(rays_o, rays_d, 0.5)
    solid = out["opacity"][..., 0] > 0.99
    assert solid.sum() > 100 and not torch.isnan(expected[solid]).any()
    depth = out["depth"][..., 0][solid] / out["opacity"][..., 0][solid]
    relative_error = (depth - expected[solid]).abs() / expected[solid]
    assert relative_error.max() < 0.03, relative_error.max()


def test_comp_normal_in_eval_points_to_the_camera_over_white():
    renderer, _ = make_renderer(CRISP_SPHERE, zero_density_mlp=True)
    set_mode(renderer, False)
    rays_o, rays_d, lights = make_cameras(azimuths=(0.0,), elevation=0.0)
    out = renderer(rays_o, rays_d, lights)
    torch.testing.assert_close(out["comp_normal"][0, 8, 8], torch.tensor([1.0, 0.5, 0.5]), atol=0.08, rtol=0)
    torch.testing.assert_close(out["comp_normal"][0, 0, 0], torch.ones(3))


def test_bg_color_overrides_the_background():
    renderer, _ = make_renderer(CRISP_SPHERE, zero_density_mlp=True)
    set_mode(renderer, False)
    rays_o, rays_d, lights = make_cameras(size=8, azimuths=(0.0, 180.0))
    out = renderer(rays_o, rays_d, lights, bg_color=torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(out["comp_rgb"][0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out["comp_rgb"][1, 0, 0], torch.tensor([0.0, 1.0, 0.0]))


def test_eval_chunks_give_the_same_image():
    renderer, _ = make_renderer({"normal_type": "finite_difference"})
    set_mode(renderer, False)
    rays_o, rays_d, lights = make_cameras(size=8)
    whole = renderer(rays_o, rays_d, lights)
    renderer.cfg.eval_chunk_size = 37
    chunked = renderer(rays_o, rays_d, lights)
    for key in whole:
        torch.testing.assert_close(chunked[key], whole[key], atol=1e-5, rtol=1e-5)


def test_empty_space_skipping_matches_dense_sampling_on_a_converged_field():
    pruned, geometry = make_renderer(CONVERGED_SPHERE, zero_density_mlp=True, randomized=False,
                                     occupancy_warmup_steps=0)
    dense = threestudio_mv.find("nerf-volume-renderer")(
        {"grid_prune": False, "randomized": False},
        geometry=geometry, material=pruned.material, background=pruned.background,
    )
    for step in range(0, 10 * 16, 16):  # several jittered updates: the grid converges to each cell's max
        pruned.update_step(0, step)
    occupied = pruned.occupancy_mask.float().mean().item()
    assert occupied < 0.25
    rays_o, rays_d, lights = make_cameras(size=12)
    out_pruned, out_dense = pruned(rays_o, rays_d, lights), dense(rays_o, rays_d, lights)
    assert out_pruned["weights"].shape[0] < 0.5 * out_dense["weights"].shape[0]
    for key in ("comp_rgb", "opacity"):
        assert (out_pruned[key] - out_dense[key]).abs().max() < 1e-3, key


@pytest.mark.parametrize("training", [True, False])
def test_density_pruning_keeps_the_image_and_drops_hidden_samples(training):
    pruning = {"prune_alpha_threshold": 0.01, "prune_early_stop_eps": 1e-4}
    outs = {}
    for prune in (False, True):
        renderer, geometry = make_renderer(CONVERGED_SPHERE, zero_density_mlp=True, randomized=False,
                                           return_comp_normal=True, **(pruning if prune else {}))
        set_mode(renderer, training)
        outs[prune] = renderer(*make_cameras(size=12))
    for key in ("comp_rgb", "opacity", "depth"):
        assert (outs[True][key] - outs[False][key]).abs().max() < 0.02, key
    if training:  # most samples are inside the solid sphere, behind its surface
        assert outs[True]["weights"].shape[0] < 0.5 * outs[False]["weights"].shape[0]


def test_density_pruning_drops_a_faint_haze_and_still_backpropagates():
    # softplus(-3) = 0.049: alpha ~0.003 per sample, below the threshold, yet 0.07-0.1 opacity across the box
    renderer, geometry = make_renderer({"density_bias": -3.0}, zero_density_mlp=True, randomized=False,
                                       prune_alpha_threshold=0.01)
    rays_o, rays_d, lights = make_cameras(size=6)
    renderer.cfg.prune_alpha_threshold = 0.0
    assert renderer(rays_o, rays_d, lights)["opacity"].min() > 0.05
    renderer.cfg.prune_alpha_threshold = 0.01
    out = renderer(rays_o, rays_d, lights)
    assert out["weights"].shape[0] == 0 and out["opacity"].abs().max() == 0
    out["comp_rgb"].sum().backward()  # no samples left: still a valid graph


@pytest.mark.parametrize("key", ["prune_alpha_threshold", "prune_early_stop_eps"])
def test_density_pruning_thresholds_are_checked(key):
    with pytest.raises(UserError, match=key):
        make_renderer(**{key: 1.5})


def test_occupancy_grid_warm_up_keeps_every_cell():
    renderer, _ = make_renderer(CRISP_SPHERE, zero_density_mlp=True, occupancy_warmup_steps=100)
    renderer.update_step(0, 0)
    assert renderer.occupancy_mask.all()
    renderer.update_step(0, 112)
    assert not renderer.occupancy_mask.all()
    state = renderer.state_dict()
    assert "occupancy_mask" in state and not any(key.startswith("geometry") for key in state)


def test_nerfacc_estimator_holds_the_grid_occupancy_as_well_as_its_mask():
    """nerfacc prunes by density with min(alpha_thre, mean(occs)): ``occs`` left at zero turns it off."""
    renderer, _ = make_renderer(CRISP_SPHERE, zero_density_mlp=True, occupancy_warmup_steps=0, prune_alpha_threshold=0.01)
    renderer.update_step(0, 0)
    estimator = renderer.occupancy_estimator()
    occs, binaries = estimator.occs, estimator.binaries.reshape(-1)
    assert torch.equal(occs, renderer.occupancy_density.reshape(-1)) and occs.mean() > 0.01
    assert min(renderer.cfg.prune_alpha_threshold, occs.mean().item()) == 0.01  # nerfacc's effective threshold
    threshold = min(renderer.cfg.occupancy_threshold, occs.mean().item())
    assert torch.equal(binaries, occs > threshold) and 0 < binaries.sum() < binaries.numel()
    # the same cell order as nerfacc's: its occupied cells are those around the sphere of radius 0.5
    res = renderer.cfg.occupancy_grid_resolution
    centres = (estimator.grid_coords + 0.5) / res * 2.0 - 1.0
    assert centres[binaries].norm(dim=-1).max() < 0.5 + 3**0.5 * 2.0 / res
    assert centres[~binaries].norm(dim=-1).min() > 0.5 - 3**0.5 * 2.0 / res
    renderer.cfg.grid_prune = False
    estimator = renderer.occupancy_estimator()
    assert estimator.binaries.all() and torch.equal(estimator.occs, torch.ones(res**3))


def test_gradients_reach_the_encoding():
    renderer, geometry = make_renderer()
    rays_o, rays_d, lights = make_cameras(size=8)
    renderer(rays_o, rays_d, lights)["comp_rgb"].mean().backward()
    assert geometry.encoding.params.grad.abs().sum() > 0
    assert all(p.grad is not None for p in geometry.density_network.parameters())
    assert all(p.grad is not None for p in geometry.feature_network.parameters())


def test_shading_material_needs_geometry_normals():
    with pytest.raises(UserError, match="normal_type"):
        make_renderer(material="diffuse-with-point-light")
    renderer, _ = make_renderer(
        {"normal_type": "analytic"}, material="diffuse-with-point-light", num_samples_per_ray=16
    )
    rays_o, rays_d, lights = make_cameras(size=6)
    out = renderer(rays_o, rays_d, lights, shading="diffuse")
    assert ((out["comp_rgb"] >= 0) & (out["comp_rgb"] <= 1)).all()


@pytest.mark.parametrize("normal_type", ["analytic", "finite_difference"])
def test_detached_shading_normals_shade_alike_but_only_colour_gets_the_light_gradient(normal_type):
    rays_o, rays_d, cameras = make_cameras(size=8)
    lights = cameras * 2.0
    images, grads = {}, {}
    for detach in (False, True):
        torch.manual_seed(0)
        renderer, geometry = make_renderer(
            {"normal_type": normal_type, **CRISP_SPHERE}, material="diffuse-with-point-light",
            randomized=False, detach_shading_normals=detach,
        )
        out = renderer(rays_o, rays_d, lights, shading="textureless")  # the light alone: a function of normals
        out["comp_rgb"].sum().backward()
        images[detach] = out["comp_rgb"].detach()
        grads[detach] = geometry.encoding.params.grad.clone()
    assert torch.allclose(images[True], images[False], atol=1e-4)
    # without the normals' path the density gets only the compositing gradient: a different one
    assert not torch.allclose(grads[True], grads[False], rtol=1e-2, atol=1e-6)


@pytest.mark.slow
def test_fit_to_a_solid_colour_sphere_lowers_the_loss():
    torch.manual_seed(0)
    rays_o, rays_d, lights = make_cameras(size=12, elevation=20.0)
    hit = ~torch.isnan(sphere_hit_distance(rays_o, rays_d, 0.4))
    target = torch.where(hit[..., None], torch.tensor([0.9, 0.1, 0.1]), torch.ones(3))
    renderer, geometry = make_renderer(num_samples_per_ray=32, occupancy_warmup_steps=0)
    optimizer = torch.optim.Adam([
        {"params": geometry.encoding.parameters(), "lr": 0.03},
        {"params": list(geometry.density_network.parameters()) + list(geometry.feature_network.parameters()),
         "lr": 0.01},
    ])
    losses = []
    for step in range(50):
        renderer.update_step(0, step)
        loss = torch.nn.functional.mse_loss(renderer(rays_o, rays_d, lights)["comp_rgb"], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"fit MSE {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0] / 5, losses


def test_trunc_exp_is_float32_under_autocast_with_the_same_gradient():
    """The density activation of the volume renderer's geometry stays float32 under 16-mixed."""
    from threestudio_mv.models.geometry.implicit_volume import trunc_exp

    x = torch.tensor([-3.0, 0.5, 11.5, 14.0, 20.0])
    reference_input = x.clone().requires_grad_(True)
    trunc_exp(reference_input).sum().backward()
    mixed_input = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(mixed_input[:, None], torch.ones(1, 1))[:, 0]  # bf16 under autocast
        assert logits.dtype == torch.bfloat16
        output = trunc_exp(logits)
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, torch.exp(logits.float()))
    output.sum().backward()
    torch.testing.assert_close(mixed_input.grad, reference_input.grad, rtol=1e-2, atol=0.0)
    assert reference_input.grad[-1] == torch.exp(torch.tensor(15.0))  # clamped at 15
