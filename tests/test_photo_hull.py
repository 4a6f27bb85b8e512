"""Unposed photos -> cameras from silhouettes and a coloured visual hull (data/photo_hull.py)."""
import numpy as np
import pytest
import torch
import trimesh

from threestudio_mv.data.mesh_render import canonical_mesh, render_mesh
from threestudio_mv.data.photo_hull import find_poses, hull_mesh, normalised_frames
from threestudio_mv.eval.metrics import volumetric_iou
from threestudio_mv.utils.camera import c2w_from_spherical
from threestudio_mv.utils.errors import UserError

TRUE_AZIMUTHS = [0.0, 75.0, 165.0, 250.0]


def asymmetric_object() -> trimesh.Trimesh:
    """A red body, a blue cabin on its -x end and a green box on its +y side: no symmetry."""
    parts = []
    for extents, centre, colour in (
        ((0.6, 0.3, 0.25), (0.0, 0.0, 0.0), (220, 30, 30)),
        ((0.25, 0.3, 0.2), (-0.17, 0.0, 0.22), (30, 30, 220)),
        ((0.15, 0.12, 0.15), (0.15, 0.21, -0.05), (30, 200, 30)),
    ):
        box = trimesh.creation.box(extents=extents)
        box.apply_translation(centre)
        box.visual.vertex_colors = np.tile(np.array([*colour, 255], dtype=np.uint8), (len(box.vertices), 1))
        parts.append(box)
    return canonical_mesh(trimesh.util.concatenate(parts))


def photos(mesh: trimesh.Trimesh, azimuths, elevation: float = 15.0, size: int = 96) -> torch.Tensor:
    """Premultiplied RGBA photos from far away (nearly orthographic), each re-framed differently."""
    count = len(azimuths)
    c2w = c2w_from_spherical(torch.full((count,), elevation), torch.tensor(azimuths), torch.full((count,), 6.0))
    rendered = render_mesh(mesh, c2w, torch.full((count,), 12.0), size)
    return torch.cat([rendered["rgb_fg"] * rendered["alpha"][..., None], rendered["alpha"][..., None]], dim=-1)


def azimuth_error(found: float, truth: float) -> float:
    return abs((found - truth + 180.0) % 360.0 - 180.0)


def test_cameras_are_found_from_silhouettes_and_the_hull_is_the_object() -> None:
    mesh = asymmetric_object()
    frames = normalised_frames(photos(mesh, TRUE_AZIMUTHS))
    poses = find_poses(frames)
    assert float(poses.azimuth[0]) == 0.0 and poses.agreement > 0.8
    # The search does at least as well as the true cameras on its own measure ...
    from threestudio_mv.data.photo_hull import _Carver

    truth = _Carver(frames[..., 3]).score([15.0] * 4, TRUE_AZIMUTHS)[0]
    assert poses.agreement >= truth - 0.01
    # ... and lands near them: silhouettes near a mirror view of one another (75 vs 105 degrees of a
    # nearly symmetric body) are told apart only by small parts, so within two search steps.
    errors = [azimuth_error(float(a), t) for a, t in zip(poses.azimuth, TRUE_AZIMUTHS)]
    assert max(errors) <= 30.0, (poses.azimuth.tolist(), errors)
    hull = canonical_mesh(hull_mesh(frames, poses))
    assert hull.is_watertight
    # The hull is in the first photo's frame: azimuth 0 is the truth's azimuth 0 here. Four views
    # leave the hull larger than the object (0.58 with the true cameras).
    assert volumetric_iou(hull, mesh, resolution=48) > 0.5
    # Colours follow the parts: the cabin's top is blue, the body's +x end red, the side box green.
    def colour_at(point):
        index = int(np.argmin(np.linalg.norm(hull.vertices - np.asarray(point), axis=1)))
        return hull.visual.vertex_colors[index, :3].astype(int)

    cabin_top = mesh.vertices[np.argmax(mesh.vertices[:, 2])]
    body_end = mesh.vertices[np.argmax(mesh.vertices[:, 0])] * [1.0, 0.0, 0.0]
    side_box = mesh.vertices[np.argmax(mesh.vertices[:, 1])] * [1.0, 1.0, 0.0]
    assert colour_at(cabin_top)[2] > 150 and colour_at(cabin_top)[0] < 100
    assert colour_at(body_end)[0] > 150 and colour_at(body_end)[2] < 100
    assert colour_at(side_box)[1] > 150 and colour_at(side_box)[0] < 100


def test_wrong_cameras_agree_less_than_the_found_ones() -> None:
    frames = normalised_frames(photos(asymmetric_object(), TRUE_AZIMUTHS))
    poses = find_poses(frames)
    from threestudio_mv.data.photo_hull import _Carver

    carver = _Carver(frames[..., 3])
    found, _ = carver.score(poses.elevation.tolist(), poses.azimuth.tolist())
    wrong, _ = carver.score(poses.elevation.tolist(), [0.0, 180.0, 90.0, 0.0])
    assert found > wrong + 0.05


def test_an_empty_photo_is_a_user_error() -> None:
    images = photos(asymmetric_object(), [0.0, 90.0])
    images[1] = 0.0
    with pytest.raises(UserError, match="no object"):
        normalised_frames(images)
