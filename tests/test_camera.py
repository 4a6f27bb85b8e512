import torch

from threestudio_mv.utils import camera


def test_c2w_is_orthonormal_and_looks_at_origin():
    elevation = torch.tensor([0.0, 30.0, -20.0, 89.0])
    azimuth = torch.tensor([0.0, 90.0, -135.0, 10.0])
    c2w = camera.c2w_from_spherical(elevation, azimuth, torch.full((4,), 2.5))
    rotation = c2w[:, :3, :3]
    assert torch.allclose(rotation.transpose(1, 2) @ rotation, torch.eye(3).expand(4, 3, 3), atol=1e-5)
    assert torch.allclose(torch.det(rotation), torch.ones(4), atol=1e-5)  # right-handed
    forward = -c2w[:, :3, 2]
    to_origin = torch.nn.functional.normalize(-c2w[:, :3, 3], dim=-1)
    assert torch.allclose(forward, to_origin, atol=1e-5)
    assert (c2w[:, 2, 1] > 0).all()  # camera up has a positive world-z component


def test_azimuth_zero_is_front_plus_x_and_counter_clockwise():
    positions = camera.spherical_to_position(torch.zeros(2), torch.tensor([0.0, 90.0]), torch.ones(2))
    assert torch.allclose(positions[0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(positions[1], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)


def test_rays_and_projection_agree():
    c2w = camera.c2w_from_spherical(torch.tensor([15.0]), torch.tensor([40.0]), torch.tensor([3.0]))
    fovy = torch.tensor([40.0])
    directions = camera.camera_ray_directions(8, 8, fovy)
    rays_o, rays_d = camera.get_rays(directions, c2w)
    # A point along the ray through pixel (row 2, col 5) projects back onto that pixel's centre.
    point = rays_o[0, 2, 5] + 2.0 * rays_d[0, 2, 5]
    projected = camera.project_points(point[None], c2w[0], fovy[0], 8, 8)[0]
    assert torch.allclose(projected[:2], torch.tensor([5.5, 2.5]), atol=1e-4)
    origin = camera.project_points(torch.zeros(1, 3), c2w[0], fovy[0], 8, 8)[0]
    assert torch.allclose(origin[:2], torch.tensor([4.0, 4.0]), atol=1e-4)


def test_mvp_matrix_maps_origin_to_clip_centre():
    c2w = camera.c2w_from_spherical(torch.tensor([10.0]), torch.tensor([70.0]), torch.tensor([2.0]))
    clip = camera.mvp_matrix(c2w, torch.tensor([40.0]))[0] @ torch.tensor([0.0, 0.0, 0.0, 1.0])
    ndc = clip[:3] / clip[3]
    assert torch.allclose(ndc[:2], torch.zeros(2), atol=1e-5) and -1 < ndc[2] < 1


def test_mvdream_condition_is_rotation_only_and_leaves_batch_alone():
    c2w = camera.c2w_from_spherical(torch.tensor([15.0, 15.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 4.0]))
    before = c2w.clone()
    cond = camera.mvdream_camera_condition(c2w)
    assert cond.shape == (2, 16)
    assert torch.equal(c2w, before)
    assert torch.allclose(cond[0], cond[1], atol=1e-6)  # distance is not seen
    assert torch.allclose(cond.view(2, 4, 4)[:, :3, 3].norm(dim=-1), torch.ones(2))


def test_view_groups_share_settings_and_are_evenly_spaced():
    groups = camera.sample_view_groups(3, 4, generator=torch.Generator().manual_seed(1))
    for key in ("elevation", "fovy", "camera_distances"):
        per_group = groups[key].view(3, 4)
        assert torch.allclose(per_group, per_group[:, :1].expand(3, 4))
    azimuth = groups["azimuth"].view(3, 4)
    gaps = (azimuth[:, 1:] - azimuth[:, :-1]) % 360.0
    assert torch.allclose(gaps, torch.full_like(gaps, 90.0), atol=1e-4)
    # relative radius: the same framing at any FOV
    relative = groups["camera_distances"] * torch.tan(torch.deg2rad(groups["fovy"]) / 2)
    assert ((relative >= 0.85 - 1e-5) & (relative <= 1.0 + 1e-5)).all()
