"""Novel views from posed images (MVGenMaster at toy scale): warp, cameras, model, CLI."""
import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

from threestudio_mv.data.procedural import __main__ as procedural_cli
from threestudio_mv.models.depth_estimator import DepthEstimator, DepthMetadata, depth_unet_config
from threestudio_mv.models.mvdiffusion import novel_views as nv
from threestudio_mv.models.mvdiffusion.sampler import noise_targets, target_loss, training_target
from threestudio_mv import nvs
from threestudio_mv.data.foreground import uncomposite
from threestudio_mv.utils.camera import CameraLight, c2w_from_spherical, camera_ray_directions, distance_for_fovy, look_at_c2w, orbit_trajectory, plucker_rays, project_points, relative_cameras
from threestudio_mv.utils.io import load_image
from threestudio_mv.utils.warp import backproject, depth_normals, splat, warp_references

CAPTION = "a red mushroom with a white stem"


@pytest.fixture(scope="module")
def views():
    cams = nv.random_cameras(4, torch.Generator().manual_seed(3))
    return {**nv.render_with_depth(CAPTION, cams["c2w"], cams["fovy"], 32), **cams}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = nv.NovelViewModel.create()
    with torch.no_grad():  # a non-zero prior encoder, so that the priors matter
        model.encoder.out.weight.normal_(0.0, 0.05)
    return model.save_pretrained(tmp_path_factory.mktemp("nvs") / "model")


@pytest.fixture(scope="module")
def depth_dir(tmp_path_factory):
    return DepthEstimator(UNet2DModel(**depth_unet_config()), DepthMetadata()).save_pretrained(
        tmp_path_factory.mktemp("depth") / "model")


# ------------------------------------------------------------------------------------------- warp
def test_warp_into_own_camera_reproduces_the_render(views):
    out = warp_references(views["rgb"][:1], views["depth"][:1], views["c2w"][:1], views["fovy"][:1], views["c2w"][:1], views["fovy"][:1], 32)
    covered = views["depth"][0] > 0
    assert covered.sum() > 50
    assert torch.equal(out["valid"][0, 0] > 0.5, covered)
    assert torch.allclose(out["values"][0][:, covered], views["rgb"][0][:, covered], atol=1e-6)
    assert torch.allclose(out["depth"][0, 0][covered], views["depth"][0][covered], rtol=1e-4)


def test_a_point_seen_by_two_references_lands_where_both_put_it():
    point = torch.tensor([0.3, -0.2, 0.4])
    size, fovy = 33, torch.tensor([40.0, 40.0])  # odd size: the centre pixel's ray is the optical axis
    positions = torch.tensor([[3.0, 0.5, 1.0], [0.2, 2.8, 1.5]])
    refs = look_at_c2w(positions, point.expand(2, 3))
    depth = torch.zeros(2, size, size)
    depth[:, size // 2, size // 2] = (positions - point).norm(dim=-1)
    points = backproject(depth, refs, fovy)[:, size // 2, size // 2]
    assert torch.allclose(points, point.expand(2, 3), atol=1e-5)
    target = look_at_c2w(torch.tensor([[-1.0, 2.5, 2.0]]))
    expected = project_points(point[None], target[0], 40.0, size, size)[0]
    for used in ([0], [1], [0, 1]):
        rgb = torch.ones(len(used), 3, size, size) * torch.tensor(used, dtype=torch.float32).view(-1, 1, 1, 1)
        out = warp_references(rgb, depth[used], refs[used], fovy[used], target, fovy[:1], size)
        landed = (out["valid"][0, 0] > 0.5).nonzero()
        assert landed.tolist() == [[int(expected[1]), int(expected[0])]]
        assert out["depth"][0, 0, int(expected[1]), int(expected[0])] == pytest.approx(float(expected[2]), rel=1e-4)


def test_splat_keeps_the_nearest_point_across_sources():
    camera = look_at_c2w(torch.tensor([[0.0, 0.0, 3.0]]) + torch.tensor([[1e-3, 0.0, 0.0]]))
    points = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, -0.5]])  # one pixel, three depths
    out = splat(points, torch.tensor([[1.0], [2.0], [3.0]]), camera, torch.tensor([40.0]), 9, 9)
    assert out["valid"].sum() == 1
    assert out["values"].max() == 2.0  # the point at z = 0.5 is nearest to the camera at z = 3
    assert out["depth"].max() == pytest.approx(2.5, abs=1e-3)


def test_soft_z_buffer_averages_one_surface_and_keeps_occluded_points_out():
    camera = look_at_c2w(torch.tensor([[0.0, 0.0, 3.0]]) + torch.tensor([[1e-3, 0.0, 0.0]]))
    points = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.02], [0.0, 0.0, -1.0]])  # one pixel: a surface, a hidden point
    values = torch.tensor([[1.0], [3.0], [10.0]])
    hard = splat(points, values, camera, torch.tensor([40.0]), 9, 9)
    soft = splat(points, values, camera, torch.tensor([40.0]), 9, 9, depth_tolerance=0.05)
    assert hard["values"].max() == 3.0  # the nearest alone
    assert soft["values"].max() == pytest.approx(2.0)  # both points of the surface, not the hidden one
    assert soft["valid"].sum() == 1 and soft["depth"].max() == pytest.approx(2.98, abs=1e-3)


def test_supersampled_warp_fills_the_holes_of_a_slanted_view(views):
    refs, target = views["c2w"][:1], views["c2w"][1:]
    args = (views["rgb"][:1], views["depth"][:1], refs, views["fovy"][:1], target, views["fovy"][1:], 32)
    plain, dense = warp_references(*args), warp_references(*args, supersample=2, depth_tolerance=0.05)
    assert dense["valid"].sum() > 1.05 * plain["valid"].sum()
    covered = (plain["valid"] > 0.5) & (dense["valid"] > 0.5)
    assert (covered.sum() / plain["valid"].sum()) > 0.97  # the pixels the plain warp covered stay covered
    own = warp_references(views["rgb"][:1], views["depth"][:1], refs, views["fovy"][:1], refs, views["fovy"][:1], 32,
                          supersample=2, depth_tolerance=0.05)
    seen = views["depth"][0] > 0
    assert torch.allclose(own["values"][0][:, seen], views["rgb"][0][:, seen], atol=1e-5)  # own camera: still the render


def test_uncomposite_recovers_the_straight_colour():
    colour, alpha = torch.rand(2, 3, 5, 5), 0.1 + 0.9 * torch.rand(2, 1, 5, 5)
    over_white = colour * alpha + (1.0 - alpha)
    assert torch.allclose(uncomposite(over_white, alpha, (1.0, 1.0, 1.0)), colour, atol=1e-5)
    assert torch.equal(uncomposite(over_white, torch.zeros_like(alpha), (1.0, 1.0, 1.0)), over_white)  # no coverage: as given


def test_depth_normals_of_a_tilted_plane():
    c2w, fovy, size = look_at_c2w(torch.tensor([[2.0, 1.0, 1.5]])), torch.tensor([40.0]), 16
    rays = torch.einsum("ij,hwj->hwi", c2w[0, :3, :3], camera_ray_directions(size, size, fovy)[0])
    depth = (-c2w[0, 2, 3] / rays[..., 2])[None]  # z-depth where each ray meets the plane z = 0
    normals = depth_normals(depth, c2w, fovy)
    assert torch.allclose(normals[0], torch.tensor([0.0, 0.0, 1.0]).expand(size, size, 3), atol=1e-4)  # up, towards the camera
    depth[0, :, size // 2 :] = 0.0  # no depth: no normal
    assert depth_normals(depth, c2w, fovy)[0, :, size // 2 :].abs().max() == 0.0


def test_back_faces_are_culled_from_the_cameras_behind_them():
    above = look_at_c2w(torch.tensor([[0.3, 0.2, 2.0]]))
    fovy, size = torch.tensor([30.0]), 16
    rays = torch.einsum("ij,hwj->hwi", above[0, :3, :3], camera_ray_directions(size, size, fovy)[0])
    depth = (-above[0, 2, 3] / rays[..., 2])[None]  # the plane z = 0 seen from above: its normal is +z
    cameras = look_at_c2w(torch.tensor([[-0.4, 0.3, 2.5], [0.4, -0.3, -2.5]]))  # another above, one below
    args = (torch.ones(1, 3, size, size), depth, above, fovy, cameras, fovy.expand(2), size)
    plain, culled = warp_references(*args), warp_references(*args, cull_back_faces=True)
    assert plain["valid"][1].sum() > 50 and culled["valid"][1].sum() == 0  # from below the plane shows its back
    assert torch.equal(culled["valid"][0], plain["valid"][0])  # from above: all of it


def test_relit_warp_reshades_for_the_target_camera():
    fovy = torch.full((3,), 40.0)
    c2w = c2w_from_spherical(torch.tensor([15.0, 15.0, 35.0]), torch.tensor([0.0, 50.0, -40.0]), distance_for_fovy(torch.full((3,), 0.9), fovy))
    views, light = nv.render_with_depth(CAPTION, c2w, fovy, 32), CameraLight()
    colour, culled = uncomposite(views["rgb"][:1], views["alpha"][:1, None], (1.0, 1.0, 1.0)), {"cull_back_faces": True}
    own = nv.relit_warp(colour, views["depth"][:1], c2w[:1], fovy[:1], c2w[:1], fovy[:1], 32, light, culled)
    seen = views["depth"][0] > 0
    assert torch.allclose(own["values"][0][:, seen], colour[0][:, seen], atol=1e-5)  # its own camera: unchanged
    relit = nv.relit_warp(colour, views["depth"][:1], c2w[:1], fovy[:1], c2w[1:], fovy[1:], 32, light, culled)
    copied = warp_references(colour, views["depth"][:1], c2w[:1], fovy[:1], c2w[1:], fovy[1:], 32, **culled)
    interior = (relit["valid"][:, 0] > 0.5) & (views["alpha"][1:] > 0.99)
    assert interior.sum() > 100
    error = lambda out: (out["values"] - views["rgb"][1:]).abs().amax(dim=1)[interior].median()  # noqa: E731
    assert error(relit) < 0.5 * error(copied)  # the camera-fixed light turned: copied shading is off, re-shaded is not


# ------------------------------------------------------------------------------------------- cameras
def test_plucker_rays_of_a_known_camera():
    c2w = torch.eye(4)[None].clone()
    c2w[0, :3, 3] = torch.tensor([1.0, 2.0, 3.0])
    rays = plucker_rays(c2w, torch.tensor([60.0]), 5, 5)
    assert rays.shape == (1, 6, 5, 5)
    assert torch.allclose(rays[0, :3, 2, 2], torch.tensor([0.0, 0.0, -1.0]))
    assert torch.allclose(rays[0, 3:, 2, 2], torch.tensor([-2.0, 1.0, 0.0]))  # o x d
    assert torch.allclose(rays[0, :3].norm(dim=0), torch.ones(5, 5), atol=1e-6)
    assert torch.allclose((rays[0, :3] * rays[0, 3:]).sum(dim=0), torch.zeros(5, 5), atol=1e-5)
    corner = rays[0, :3, 0, 4]  # top right: x right, y up
    assert corner[0] > 0 and corner[1] > 0


def test_relative_cameras_normalise_to_the_first_and_cap_the_box():
    c2w = look_at_c2w(torch.tensor([[4.0, 0.0, 1.0], [-4.0, 0.5, 1.0], [0.0, 4.0, 2.0]]))
    relative, scale = relative_cameras(c2w, c2w[0], longest_side=5.0)
    assert torch.allclose(relative[0], torch.eye(4), atol=1e-5)
    centres = relative[:, :3, 3]
    assert (centres.max(0).values - centres.min(0).values).max() == pytest.approx(5.0, rel=1e-4)
    unscaled = torch.linalg.inv(c2w[0])[None] @ c2w
    assert torch.allclose(centres, scale * unscaled[:, :3, 3], atol=1e-5) and scale < 1.0
    assert torch.allclose(relative[:, :3, :3], unscaled[:, :3, :3], atol=1e-6)
    assert relative_cameras(c2w, c2w[0], longest_side=100.0)[1] == 1.0


def test_orbit_trajectories():
    first = look_at_c2w(torch.tensor([[2.0, 0.0, 0.5]]))[0]
    bi = orbit_trajectory("bi_direction", 5, first, 90.0)
    assert bi.shape == (5, 4, 4)
    assert torch.allclose(bi[2, :3, 3], first[:3, 3], atol=1e-5)  # the middle frame is the reference's camera
    assert torch.allclose(bi[:, :3, 3].norm(dim=-1), first[:3, 3].norm().expand(5), atol=1e-5)
    with pytest.raises(ValueError, match="unknown trajectory"):
        orbit_trajectory("disorder", 3, first, 90.0)


# ------------------------------------------------------------------------------------------- model
def test_zeroed_priors_equal_the_unconditional_branch(model_dir, views):
    model = nv.NovelViewModel.from_pretrained(model_dir)
    cond = nv.frame_conditions(views["rgb"][:2], views["depth"][:2], views["c2w"][:2], views["fovy"][:2], views["c2w"][2:], views["fovy"][2:], model.metadata)
    uncond = nv.drop_conditions(cond, cameras=True, priors=True)
    assert torch.equal(uncond[:, nv.MASK], cond[:, nv.MASK]) and uncond[:, 1:].abs().sum() == 0
    refs = views["rgb"][:2]
    run = lambda c, s: nv.generate_views(model, c, refs, s, 2, generator=torch.Generator().manual_seed(0))  # noqa: E731
    assert torch.allclose(run(uncond, 1.0), run(uncond, 4.0), atol=1e-5)  # zero priors + cameras: CFG has nothing to add
    assert not torch.allclose(run(cond, 1.0), run(uncond, 1.0), atol=1e-3)  # the priors change the output


def test_references_come_out_unchanged_and_key_rescale_acts(model_dir, views):
    model = nv.NovelViewModel.from_pretrained(model_dir)
    cond = nv.frame_conditions(views["rgb"][:2], views["depth"][:2], views["c2w"][:2], views["fovy"][:2], views["c2w"][2:], views["fovy"][2:], model.metadata)
    two = torch.cat([cond, cond])
    out = nv.generate_views(model, two, torch.cat([views["rgb"][:2]] * 2), 2.0, 2, generator=torch.Generator().manual_seed(0), num_samples=2)
    assert out.shape == (8, 3, 32, 32)
    assert torch.equal(out[:2], views["rgb"][:2]) and torch.equal(out[4:6], views["rgb"][:2])
    sample, t = torch.randn(4, 3, 32, 32), torch.tensor(500)
    with torch.no_grad():
        plain = model(sample, t, cond, 4, 2, 1.0)
        rescaled = model(sample, t, cond, 4, 2, 1.5)
    assert not torch.allclose(plain, rescaled, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(plain, model(sample, t, cond, 4, 0, 1.5))  # no references: nothing to rescale


def test_warp_anchor_sets_warped_pixels_from_its_start_step(model_dir, views):
    model = nv.NovelViewModel.from_pretrained(model_dir)
    cond = nv.frame_conditions(views["rgb"][:2], views["depth"][:2], views["c2w"][:2], views["fovy"][:2], views["c2w"][2:], views["fovy"][2:], model.metadata)
    valid = cond[:, nv.WARPED.stop - 1] > 0.5
    assert valid[2:].sum() > 50  # the targets see some of the references
    anchor = nv.WarpAnchor(cond, torch.ones(3), start_step=1)
    x0 = torch.full((4, 3, 32, 32), 0.3)
    first, second = anchor(x0), anchor(x0)
    assert torch.allclose(first, torch.ones_like(first))  # step 0: the background anchor only (border -> white)
    warped = cond[:, nv.WARPED.start : nv.WARPED.start + 3]
    interior = valid & (-torch.nn.functional.max_pool2d(-valid[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0.5)
    fringe = valid & ~interior
    assert interior[2:].sum() > 20 and fringe[2:].sum() > 20
    assert torch.equal(second.permute(0, 2, 3, 1)[interior], warped.permute(0, 2, 3, 1)[interior])
    assert torch.allclose(second.permute(0, 2, 3, 1)[~valid], torch.ones(int((~valid).sum()), 3))
    # the fringe: x0 projected onto the segment from the background (1) to the warped colour
    away, got = (warped - 1.0).permute(0, 2, 3, 1)[fringe], (second - 1.0).permute(0, 2, 3, 1)[fringe]
    share = (got * away).sum(-1) / (away * away).sum(-1).clamp_min(1e-4)
    assert share.min() >= 0.0 and share.max() <= 1.0 + 1e-5
    assert torch.allclose(got, share[:, None] * away, atol=1e-5)
    refs = views["rgb"][:2]
    anchored = nv.generate_views(model, cond, refs, 1.0, 4, generator=torch.Generator().manual_seed(0), warp_anchor_start=0.5)
    plain = nv.generate_views(model, cond, refs, 1.0, 4, generator=torch.Generator().manual_seed(0), warp_anchor_start=1.0)
    target_valid = interior[2:]
    expected = ((warped[2:] + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1)[target_valid]
    error = lambda out: (out[2:].permute(0, 2, 3, 1)[target_valid] - expected).abs().mean()  # noqa: E731
    assert error(anchored) < 0.02 < error(plain)


def test_palette_matching_leaves_anchored_pixels_and_blends_the_edge(model_dir, views):
    from threestudio_mv.data.foreground import match_palette_by_mask

    red = torch.tensor([[0.9, 0.1, 0.1]])
    image = torch.ones(1, 3, 7, 7)
    image[..., 1:6, 1:6] = torch.tensor([0.8, 0.3, 0.25]).view(3, 1, 1)
    image[..., 1, 1:6] = 0.5 * torch.tensor([0.8, 0.3, 0.25]).view(3, 1) + 0.5  # an edge row, half background
    foreground = (image < 0.95).any(dim=1, keepdim=True)
    matched = match_palette_by_mask(image, foreground, red, (1.0, 1.0, 1.0))
    assert torch.allclose(matched[0, :, 3, 3], red[0])  # interior: the palette colour
    edge = matched[0, :, 1, 3]
    assert 0.3 < float((1.0 - edge[1]) / (1.0 - red[0, 1])) < 0.7 and torch.allclose(edge, 1.0 + (edge[1] - 1.0) / (red[0, 1] - 1.0) * (red[0] - 1.0), atol=1e-5)
    assert torch.equal(matched[..., 0, :], image[..., 0, :])  # background row: as given
    model = nv.NovelViewModel.from_pretrained(model_dir)
    cond = nv.frame_conditions(views["rgb"][:2], views["depth"][:2], views["c2w"][:2], views["fovy"][:2], views["c2w"][2:], views["fovy"][2:], model.metadata)
    args = (model, cond, views["rgb"][:2], 1.0, 4)
    plain = nv.generate_views(*args, generator=torch.Generator().manual_seed(0), warp_anchor_start=0.5)
    matched = nv.generate_views(*args, generator=torch.Generator().manual_seed(0), warp_anchor_start=0.5, palettes=[red])
    anchored = cond[:, nv.WARPED.stop - 1 : nv.WARPED.stop].expand(-1, 3, -1, -1) > 0.5
    assert torch.equal(matched[anchored], plain[anchored]) and torch.equal(matched[:2], plain[:2])  # anchored pixels, references
    changed = (matched != plain).any(dim=1)
    assert changed.sum() > 0 and not bool((changed & anchored[:, 0]).any())


def test_fresh_prior_encoder_is_the_identity_and_folder_round_trips(model_dir, views, tmp_path):
    fresh = nv.NovelViewModel.create().eval()
    cond = nv.frame_conditions(views["rgb"][:1], views["depth"][:1], views["c2w"][:1], views["fovy"][:1], views["c2w"][1:], views["fovy"][1:], fresh.metadata)
    no_ccm = cond.clone()
    no_ccm[:, nv.PIXEL_CONDITION_CHANNELS:] = 0.0
    sample = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(sample, torch.tensor(10), cond, 4), fresh(sample, torch.tensor(10), no_ccm, 4))
        loaded = nv.NovelViewModel.from_pretrained(fresh.save_pretrained(tmp_path / "m"))
        assert torch.allclose(fresh(sample, torch.tensor(10), cond, 4), loaded(sample, torch.tensor(10), cond, 4), atol=2e-2)
    unet = UNet2DConditionModel.from_pretrained(str(model_dir / "unet"))
    assert unet.config.in_channels == 3 + nv.PIXEL_CONDITION_CHANNELS
    with pytest.raises(nv.UserError, match="not a novel-view model folder"):
        nv.NovelViewModel.from_pretrained(tmp_path)


def test_training_loss_goes_down_on_targets_only():
    torch.manual_seed(0)
    model = nv.NovelViewModel.create(nv.NovelViewMetadata(frames_per_sample=4)).train()
    sample = nv.training_sample(CAPTION, 2, model.metadata, torch.Generator().manual_seed(1))
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    is_reference = torch.arange(4) < 2
    noise, t = torch.randn(4, 3, 32, 32), torch.full((4,), 400)
    noisy = noise_targets(scheduler, sample["clean"], noise, t, is_reference)
    assert torch.equal(noisy[:2], sample["clean"][:2])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(10):
        loss = target_loss(model(noisy, t, sample["condition"], 4), training_target(scheduler, sample["clean"], noise, t), is_reference)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_train_checkpoints_and_resumes(tmp_path, capsys):
    cfg = nv.TrainConfig(out=tmp_path / "run", steps=1, samples_per_step=1, frames=4, ckpt_every=1, command="test")
    nv.train(cfg)
    nv.train(nv.TrainConfig(out=tmp_path / "run", steps=2, samples_per_step=1, frames=4, ckpt_every=1, command="test"))
    assert "resumed train nvs from step 1" in capsys.readouterr().out
    assert len((tmp_path / "run" / "log.csv").read_text().splitlines()) == 2
    assert nv.NovelViewModel.from_pretrained(tmp_path / "run" / "model").metadata.training_command == "test"
    continued = nv.train(nv.TrainConfig(out=tmp_path / "more", steps=1, samples_per_step=1, frames=4, ckpt_every=1, command="more",
                                        init=tmp_path / "run" / "model", warp_supersample=2, warp_depth_tolerance=0.05,
                                        warp_straight_colour=True, warp_relight=True))
    meta = nv.NovelViewModel.from_pretrained(continued).metadata
    assert meta.training_command == "test && more"
    assert (meta.warp_supersample, meta.warp_depth_tolerance) == (2, 0.05)  # the continued model's splatting
    assert meta.warp_straight_colour and meta.warp_relight
    assert nv.NovelViewModel.from_pretrained(tmp_path / "run" / "model").metadata.warp_supersample == 1


def test_depth_estimator_masks_and_round_trips(depth_dir, views):
    model = DepthEstimator.from_pretrained(depth_dir)
    depth = model.estimate(views["rgb"], views["fovy"], views["alpha"])
    assert depth.shape == (4, 32, 32)
    assert torch.equal(depth > 0, views["alpha"] >= 0.5)


# ------------------------------------------------------------------------------------------- CLIs
@pytest.fixture(scope="module")
def posed_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("posed") / "refs"
    procedural_cli.main(["render", "--prompt", CAPTION, "--views", "2", "--size", "32", "--out", str(folder)])
    return folder


def test_render_at_given_cameras_reproduces_the_orbit(posed_folder, tmp_path):
    procedural_cli.main(["render", "--prompt", CAPTION, "--cameras", str(posed_folder / "transforms.json"), "--size", "32", "--out", str(tmp_path / "again")])
    for index in range(2):
        assert np.array_equal(load_image(posed_folder / f"rgb_{index:03d}.png"), load_image(tmp_path / "again" / f"rgb_{index:03d}.png"))


def test_cli_writes_views_and_target_cameras_in_order(model_dir, posed_folder, tmp_path):
    out = tmp_path / "out"
    nvs.main(["--input_path", str(posed_folder), "--output_path", str(out), "--model", str(model_dir), "--nframe", "5", "--steps", "1"])
    meta = json.loads((out / "transforms.json").read_text())
    assert len(meta["frames"]) == 5 and (out / "video.mp4").is_file()
    reference = load_image(out / meta["frames"][0]["file_path"])
    given = load_image(posed_folder / "rgb_000.png")
    assert np.allclose(reference[..., 3], given[..., 3], atol=1 / 255 + 1e-6)
    assert meta["generator"]["depth"] == "given"
    assert nvs.load_references(str(posed_folder), 32, {})["light"] == CameraLight()  # the renders' light, for the relit warp
    targets = tmp_path / "targets.json"
    c2w = look_at_c2w(torch.tensor([[2.5, 0.0, 0.8], [0.0, -2.5, 0.3], [-1.0, 2.0, 1.5]]))
    targets.write_text(json.dumps({"camera_angle_x": math.radians(40.0), "frames": [{"transform_matrix": m.tolist()} for m in c2w]}))
    nvs.main(["--input_path", str(posed_folder), "--output_path", str(tmp_path / "t"), "--model", str(model_dir), "--target_cameras", str(targets), "--steps", "1"])
    written = json.loads((tmp_path / "t" / "transforms.json").read_text())["frames"]
    assert np.allclose(np.array([f["transform_matrix"] for f in written]), c2w.numpy(), atol=1e-6)
    assert all((tmp_path / "t" / f["file_path"]).is_file() for f in written)


def test_single_image_uses_the_depth_estimator(model_dir, depth_dir, posed_folder, tmp_path):
    nvs.main(["--input_path", str(posed_folder / "rgb_000.png"), "--output_path", str(tmp_path / "one"), "--model", str(model_dir),
              "--depth_model", str(depth_dir), "--nframe", "3", "--steps", "1"])
    meta = json.loads((tmp_path / "one" / "transforms.json").read_text())
    assert meta["generator"]["depth"] == "estimated" and len(meta["frames"]) == 3


def _folder(tmp_path, frames, write_image=True):
    folder = tmp_path / "in"
    folder.mkdir()
    if write_image:
        from threestudio_mv.utils.io import save_image

        save_image(folder / "a.png", np.ones((32, 32, 4), dtype=np.float32))
    (folder / "transforms.json").write_text(json.dumps({"camera_angle_x": 0.7, "frames": frames}))
    return folder


@pytest.mark.parametrize("case, message", [
    ("no_transforms", "without transforms.json"),
    ("not_rigid", "not a rigid camera-to-world pose"),
    ("missing_image", "not found"),
    ("zero_references", "0 references"),
    ("empty_targets", "has no frames"),
])
def test_bad_input_is_one_line_exit_2(case, message, model_dir, posed_folder, tmp_path, capsys):
    good = {"file_path": "a.png", "transform_matrix": torch.eye(4).tolist()}
    args = ["--output_path", str(tmp_path / "o"), "--model", str(model_dir), "--steps", "1"]
    if case == "no_transforms":
        (tmp_path / "empty").mkdir()
        args += ["--input_path", str(tmp_path / "empty")]
    elif case == "not_rigid":
        args += ["--input_path", str(_folder(tmp_path, [{**good, "transform_matrix": (2 * torch.eye(4)).tolist()}]))]
    elif case == "missing_image":
        args += ["--input_path", str(_folder(tmp_path, [{**good, "file_path": "b.png"}]))]
    elif case == "zero_references":
        args += ["--input_path", str(_folder(tmp_path, []))]
    else:
        (tmp_path / "t.json").write_text(json.dumps({"camera_angle_x": 0.7, "frames": []}))
        args += ["--input_path", str(posed_folder), "--target_cameras", str(tmp_path / "t.json")]
    with pytest.raises(SystemExit) as raised:
        nvs.main(args)
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_eval_warp_only_compares_the_dense_warp_with_the_plain_one(tmp_path, capsys):
    from threestudio_mv.eval import nvs as eval_nvs

    meta = nv.NovelViewMetadata(warp_supersample=2, warp_depth_tolerance=0.05, warp_straight_colour=True, warp_relight=True)
    folder = nv.NovelViewModel.create(meta).save_pretrained(tmp_path / "model")
    eval_nvs.main(["--out", str(tmp_path / "eval"), "--assets", "2", "--targets", "3", "--references", "2",
                   "--model", str(folder), "--warp_only"])
    arms = json.loads((tmp_path / "eval" / "results.json").read_text())["by_references"]["2"]
    assert set(arms) == {"warp_only", "warp_only_plain", "truth"}  # no sampled arm
    assert 0.5 < arms["warp_only_plain"]["coverage"] < arms["warp_only"]["coverage"] <= 1.0
    assert arms["warp_only"]["delta_e_overlap"] < arms["warp_only_plain"]["delta_e_overlap"] - 1.0  # straight colour, re-shaded
    assert '"warp_only_plain"' in capsys.readouterr().out
