import math

import numpy as np
import pytest
import torch
import trimesh

import threestudio_mv
from threestudio_mv.models.geometry.isosurface import extract_isosurface
from threestudio_mv.utils.errors import UserError

SMALL_HASH = {"otype": "HashGrid", "n_levels": 6, "log2_hashmap_size": 12, "base_resolution": 8, "per_level_scale": 1.5}


def make_geometry(**overrides):
    config = {"pos_encoding_config": SMALL_HASH, "isosurface_resolution": 48, **overrides}
    return threestudio_mv.find("implicit-volume")(config)


def zero_density_network(geometry):
    """Make the density exactly activation(bias(x)): a known radial field."""
    with torch.no_grad():
        for parameter in geometry.density_network.parameters():
            parameter.zero_()


def n_components(mesh):
    return len(trimesh.graph.connected_components(
        trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy(), process=False).face_adjacency,
        nodes=np.arange(len(mesh.faces)),
    ))


@pytest.mark.parametrize("bias", ["blob_magic3d", "blob_dreamfusion"])
def test_blob_bias_makes_centre_denser_than_corners(bias):
    geometry = make_geometry(density_bias=bias)
    density = geometry.forward_density(torch.tensor([[0.0, 0.0, 0.0], [0.95, 0.95, 0.95], [-0.95, 0.95, -0.95]]))
    assert density.shape == (3, 1)
    assert density[0] > 5.0 and (density[1:] < 0.1 * density[0]).all()


def test_forward_outputs_and_float_bias():
    geometry = make_geometry(n_feature_dims=5, density_bias=-3.0, density_activation="exp")
    out = geometry(torch.rand(20, 3) * 2 - 1)
    assert out["density"].shape == (20, 1) and out["features"].shape == (20, 5)
    assert "normal" not in out
    torch.testing.assert_close(out["density"], torch.full((20, 1), math.exp(-3.0)), rtol=0.01, atol=0)
    assert geometry.export(torch.rand(7, 3))["features"].shape == (7, 5)


def test_density_blob_std_schedule_is_used_in_forward():
    geometry = make_geometry(density_blob_std=[0, 0.5, 0.2, 100])
    zero_density_network(geometry)
    point = torch.tensor([[0.4, 0.0, 0.0]])
    before = geometry.forward_density(point)
    torch.testing.assert_close(before, torch.nn.functional.softplus(torch.tensor([[10.0 * (1 - 0.4 / 0.5)]])))
    geometry.update_step(0, 100)
    after = geometry.forward_density(point)
    torch.testing.assert_close(after, torch.nn.functional.softplus(torch.tensor([[10.0 * (1 - 0.4 / 0.2)]])))


@pytest.mark.parametrize("normal_type", ["finite_difference", "analytic"])
def test_normals_of_a_blob_point_outward(normal_type):
    geometry = make_geometry(normal_type=normal_type)
    generator = torch.Generator().manual_seed(3)
    directions = torch.nn.functional.normalize(torch.randn(200, 3, generator=generator), dim=-1)
    points = directions * (0.2 + 0.6 * torch.rand(200, 1, generator=generator))
    out = geometry(points, output_normal=True)
    assert out["normal"].shape == (200, 3)
    torch.testing.assert_close(out["normal"].norm(dim=-1), torch.ones(200))
    cosine = (out["normal"] * directions).sum(-1)
    assert cosine.min() > 0.9
    assert torch.equal(out["shading_normal"], out["normal"])


def test_analytic_normals_are_differentiable_in_training_and_detached_in_eval():
    geometry = make_geometry(normal_type="analytic")
    points = torch.rand(30, 3) - 0.5
    out = geometry(points, output_normal=True)
    out["normal"][:, 0].sum().backward()
    assert geometry.encoding.params.grad.abs().sum() > 0
    with torch.no_grad():
        out = geometry(points, output_normal=True)
    assert not out["normal"].requires_grad and not out["density"].requires_grad


def test_isosurface_of_a_known_sphere_has_the_right_radius():
    # density = softplus(10 (1 - r / 0.5)) equals softplus(0) = ln 2 exactly on the sphere r = 0.5.
    geometry = make_geometry(isosurface_threshold=math.log(2.0))
    zero_density_network(geometry)
    mesh = geometry.isosurface()
    radii = mesh.vertices.norm(dim=-1)
    assert mesh.faces.dtype == torch.long and mesh.vertices.shape[1] == 3 and len(mesh.faces) > 500
    assert abs(radii.mean().item() - 0.5) < 0.025 and radii.std() < 0.01
    tri = trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy())
    assert tri.is_watertight and tri.volume > 0  # closed, normals pointing out
    assert abs(tri.volume - 4 / 3 * math.pi * 0.5**3) / (4 / 3 * math.pi * 0.5**3) < 0.05


def _sphere_and_speck(points):
    """Density 50 inside a sphere of radius 0.5 and a speck of radius 0.04 at (0.75, 0.75, 0.75), crisp edges."""
    big = torch.sigmoid((0.5 - points.norm(dim=-1)) * 1000.0)
    small = torch.sigmoid((0.04 - (points - 0.75).norm(dim=-1)) * 1000.0)
    return (50.0 * torch.maximum(big, small))[:, None]


def test_isosurface_removes_small_components():
    box_min, box_max = torch.full((3,), -1.0), torch.full((3,), 1.0)
    kept = extract_isosurface(_sphere_and_speck, box_min, box_max, 96, threshold=25.0, remove_outliers=False)
    cleaned = extract_isosurface(_sphere_and_speck, box_min, box_max, 96, threshold=25.0, remove_outliers=True)
    assert n_components(kept) == 2
    assert n_components(cleaned) == 1
    radii = cleaned.vertices.norm(dim=-1)
    assert abs(radii.mean().item() - 0.5) < 0.025


def test_auto_threshold_follows_the_opaque_region():
    box_min, box_max = torch.full((3,), -1.0), torch.full((3,), 1.0)
    mesh = extract_isosurface(_sphere_and_speck, box_min, box_max, 96, threshold="auto")
    assert 0.0 < mesh.level < 50.0
    radii = mesh.vertices.norm(dim=-1)
    assert abs(radii.max().item() - 0.5) < 0.025 and n_components(mesh) == 1


def test_auto_threshold_of_a_geometry_matches_its_rendered_silhouette():
    geometry = make_geometry()
    zero_density_network(geometry)
    mesh = geometry.isosurface()
    radius = mesh.vertices.norm(dim=-1).mean().item()
    # The silhouette radius: the ray distance p from the centre at which the optical depth through
    # softplus(10 (1 - r / 0.5)) is ln 2 (50% opacity), by numerical integration.
    s = torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64)
    p = torch.linspace(0.3, 0.6, 601, dtype=torch.float64)
    radius_along_ray = (p[:, None] ** 2 + s**2).sqrt()
    optical_depth = torch.nn.functional.softplus(10 * (1 - radius_along_ray / 0.5)).sum(-1) * (s[1] - s[0])
    silhouette = p[(optical_depth > math.log(2.0)).sum() - 1].item()
    assert abs(radius - silhouette) < 0.02, (radius, silhouette)


def test_isosurface_level_outside_the_field_range_is_a_user_error():
    geometry = make_geometry(isosurface_threshold=1.0e6)
    with pytest.raises(UserError, match=r"outside the field's range \[.*\]; set system.geometry.isosurface_threshold"):
        geometry.isosurface()
    hazy = lambda p: torch.full((p.shape[0], 1), 0.01)  # noqa: E731  never 50% opaque
    with pytest.raises(UserError, match="isosurface_threshold"):
        extract_isosurface(hazy, torch.full((3,), -1.0), torch.full((3,), 1.0), 16, threshold="auto")


def test_bad_geometry_config_is_a_user_error():
    with pytest.raises(UserError, match="system.geometry.density_activation"):
        make_geometry(density_activation="relu")
    with pytest.raises(UserError, match="system.geometry.normal_type"):
        make_geometry(normal_type="pred")
    with pytest.raises(UserError, match="system.geometry.radius"):
        make_geometry(radius="big")


def _hollow_ball(points):
    """Density 50 in a ball of radius 0.5 with an enclosed bubble of radius 0.2 (density 0) inside."""
    radius = points.norm(dim=-1)
    ball = torch.sigmoid((0.5 - radius) * 1000.0) * torch.sigmoid((radius - 0.2) * 1000.0)
    return (50.0 * ball)[:, None]


def test_isosurface_fills_enclosed_cavities():
    box_min, box_max = torch.full((3,), -1.0), torch.full((3,), 1.0)
    hollow = extract_isosurface(_hollow_ball, box_min, box_max, 64, threshold=25.0, fill_cavities=False)
    filled = extract_isosurface(_hollow_ball, box_min, box_max, 64, threshold=25.0, fill_cavities=True)
    assert hollow.vertices.norm(dim=-1).min() < 0.25  # the bubble's inner wall is meshed
    assert filled.vertices.norm(dim=-1).min() > 0.45  # only the outer sphere is left
    assert n_components(filled) == 1


def _noisy_ball(points):
    """A ball of radius 0.5 whose density carries voxel-scale noise near the level."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(points.shape[0], generator=generator) * 2.0 - 1.0
    return (25.0 + 40.0 * (0.5 - points.norm(dim=-1)) + 8.0 * noise)[:, None].clamp_min(0.0)


def test_isosurface_smoothing_removes_voxel_noise():
    box_min, box_max = torch.full((3,), -1.0), torch.full((3,), 1.0)
    raw = extract_isosurface(_noisy_ball, box_min, box_max, 48, threshold=25.0, smooth_sigma=0.0)
    smooth = extract_isosurface(_noisy_ball, box_min, box_max, 48, threshold=25.0, smooth_sigma=1.5)
    raw_mesh = trimesh.Trimesh(raw.vertices.numpy(), raw.faces.numpy())
    smooth_mesh = trimesh.Trimesh(smooth.vertices.numpy(), smooth.faces.numpy())
    assert smooth_mesh.euler_number == 2  # one closed sphere
    assert raw_mesh.euler_number != 2 or len(raw.faces) > 1.5 * len(smooth.faces)
    radii = smooth.vertices.norm(dim=-1)
    assert abs(radii.mean().item() - 0.5) < 0.03
