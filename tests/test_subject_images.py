"""Subject images for MVDreamBooth: bad inputs, masking RGB on white, posed groups, mesh input."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from threestudio_mv.data.procedural import parse_caption, render_views
from threestudio_mv.utils.camera import view_group
from threestudio_mv.data.subject_images import SubjectImagesDataModule, group_views, mask_plain_background
from threestudio_mv.utils.camera import spherical_from_position
from threestudio_mv.utils.errors import UserError
from threestudio_mv.utils.io import save_image

CAPTION = "a red cube on top of a blue cylinder"


def write_views(folder: Path, n_views: int = 8, size: int = 32, rgba: bool = True, posed: bool = False) -> dict:
    """Renders of a procedural asset; RGBA PNGs, or RGB on white (the same pixels composited)."""
    cameras = view_group(n_views, elevation=15.0, fovy=40.0)
    views = render_views(parse_caption(CAPTION), cameras["c2w"], cameras["fovy"], size)
    folder.mkdir(parents=True, exist_ok=True)
    frames = []
    for i in range(n_views):
        image = torch.cat([views["rgb_fg"][i], views["alpha"][i, ..., None]], dim=-1) if rgba else views["rgb"][i]
        save_image(folder / f"view_{i}.png", image)
        frames.append({"file_path": f"view_{i}.png", "transform_matrix": cameras["c2w"][i].tolist()})
    if posed:
        (folder / "transforms.json").write_text(json.dumps({"camera_angle_x": math.radians(40.0), "frames": frames}))
    return {"alpha": views["alpha"], "c2w": cameras["c2w"]}


def datamodule(image_dir: Path, **options) -> SubjectImagesDataModule:
    return SubjectImagesDataModule({"image_dir": str(image_dir), "image_size": 32, **options})


def test_empty_folder_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"holds no image .*notes\.txt.*at least 2 images"):
        datamodule(tmp_path)


def test_a_non_image_file_among_the_photos_is_a_user_error_naming_it(tmp_path: Path) -> None:
    write_views(tmp_path, n_views=3)
    (tmp_path / "notes.docx").write_text("not a photo")
    with pytest.raises(UserError, match=r"'notes\.docx' is not an image"):
        datamodule(tmp_path)
    (tmp_path / "notes.docx").unlink()
    (tmp_path / ".DS_Store").write_text("hidden files are not the user's")
    assert datamodule(tmp_path, unposed_views="none").subject.rgb.shape[0] == 3


def test_a_mesh_with_no_faces_is_a_user_error(tmp_path: Path) -> None:
    points = tmp_path / "points.obj"
    points.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    with pytest.raises(UserError, match=r"points\.obj' has no triangles"):
        datamodule(points)


def test_one_image_is_a_user_error(tmp_path: Path) -> None:
    write_views(tmp_path, n_views=1)
    with pytest.raises(UserError, match=rf"'{tmp_path}' holds only 1 image \(view_0.png\).*at least 2"):
        datamodule(tmp_path)


def test_not_an_image_or_mesh_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "subject.txt"
    path.write_text("not an image")
    with pytest.raises(UserError, match="neither an image folder nor a mesh file"):
        datamodule(path)
    with pytest.raises(UserError, match="does not exist"):
        datamodule(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_text("not a png")
    (broken / "b.png").write_text("not a png either")
    with pytest.raises(UserError, match=r"cannot read image '.*a\.png'"):
        datamodule(broken)


def test_rgb_on_white_is_masked_like_the_true_alpha(tmp_path: Path) -> None:
    truth = write_views(tmp_path, n_views=4, rgba=False)
    subject = datamodule(tmp_path, recenter=False, unposed_views="none").subject
    assert subject.source == "images" and subject.mode == "single-view" and subject.c2w is None
    true_mask, mask = truth["alpha"] > 0.5, subject.alpha > 0.5
    iou = (true_mask & mask).sum() / (true_mask | mask).sum()
    assert iou > 0.9, float(iou)
    # Background pixels become exactly the training background.
    assert torch.allclose(subject.rgb[truth["alpha"] == 0], torch.ones(3))


def test_mask_rejects_a_busy_border() -> None:
    noisy = np.random.default_rng(0).random((32, 32, 3))
    with pytest.raises(UserError, match="not one plain colour"):
        mask_plain_background(noisy, 0.1, "photo.jpg")


def test_recenter_frames_the_object(tmp_path: Path) -> None:
    # A small grey square off-centre on a large white canvas.
    canvas = np.full((100, 160, 3), 255, dtype=np.uint8)
    canvas[10:30, 100:120] = 90
    for name in ("a.png", "b.jpg"):
        Image.fromarray(canvas).save(tmp_path / name)
    subject = datamodule(tmp_path, object_fraction=0.5).subject
    alpha = subject.alpha[0] > 0.5
    rows, cols = torch.nonzero(alpha, as_tuple=True)
    assert abs(rows.float().mean() - 15.5) < 1.0 and abs(cols.float().mean() - 15.5) < 1.0
    assert 14 <= int(rows.max() - rows.min() + 1) <= 18  # half of the 32 px frame


def test_posed_views_form_groups_of_four(tmp_path: Path) -> None:
    truth = write_views(tmp_path, n_views=8, posed=True)
    subject = datamodule(tmp_path).subject
    assert subject.source == "posed images" and subject.mode == "multi-view"
    assert sorted(map(sorted, subject.groups)) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for group in subject.groups:
        _, azimuth, _ = spherical_from_position(truth["c2w"][group, :3, 3])
        assert torch.allclose(azimuth.diff() % 360.0, torch.full((3,), 90.0), atol=1e-3)
    module = datamodule(tmp_path, batch_size=4)
    module.setup("fit")
    item = module.train_set[0]
    assert item["num_views"] == 4 and item["images"].shape == (4, 3, 32, 32)
    assert torch.count_nonzero(item["camera"]) > 0


def test_views_without_partners_stay_single() -> None:
    cameras = view_group(4, elevation=10.0)
    odd = view_group(1, elevation=25.0, azimuth_start=45.0)
    groups, singles = group_views(torch.cat([cameras["c2w"], odd["c2w"]]), 10.0)
    assert groups == [[0, 1, 2, 3]] and singles == [4]
    groups, singles = group_views(cameras["c2w"][:3], 10.0)
    assert groups == [] and singles == [0, 1, 2]


def test_mesh_input_gives_posed_coloured_views(tmp_path: Path) -> None:
    # A long box along y in a y-up file: in our z-up world it must stand along z.
    box = trimesh.creation.box(extents=(0.5, 2.0, 0.5))
    box.export(tmp_path / "pillar.obj")
    module = datamodule(tmp_path / "pillar.obj", mesh_up_axis="+y", mesh_color="red", mesh_views=8)
    subject = module.subject
    assert subject.source == "mesh" and subject.mode == "multi-view" and subject.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert subject.rgb.shape == (8, 32, 32, 3) and subject.c2w.shape == (8, 4, 4)
    elevation, azimuth, _ = spherical_from_position(subject.c2w[:, :3, 3])
    assert 0.0 <= float(elevation.min()) and float(elevation.max()) <= 30.0
    assert torch.allclose(azimuth[:4].diff() % 360.0, torch.full((3,), 90.0), atol=1e-3)
    for view in range(8):
        rows, cols = torch.nonzero(subject.alpha[view] > 0.5, as_tuple=True)
        assert int(rows.max() - rows.min()) > 1.5 * int(cols.max() - cols.min())  # standing upright
    fg = subject.rgb[subject.alpha > 0.99]
    assert (fg[:, 0] > 2.0 * fg[:, 1]).all() and (fg[:, 0] > 0.4).all()  # shaded red


def test_a_vertex_coloured_ply_keeps_its_colours(tmp_path: Path) -> None:
    from threestudio_mv.data.mesh_render import load_subject_mesh

    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    green = np.tile([30, 200, 40, 255], (len(box.vertices), 1)).astype(np.uint8)
    green[box.vertices[:, 2] > 0] = [200, 30, 40, 255]  # red top, green bottom
    trimesh.Trimesh(box.vertices, box.faces, vertex_colors=green, process=False).export(tmp_path / "box.ply")
    mesh = load_subject_mesh(tmp_path / "box.ply", colour=(0.5, 0.5, 0.5))
    colours = np.asarray(mesh.visual.vertex_colors)
    assert (colours[mesh.vertices[:, 2] > 0, :3] == [200, 30, 40]).all()
    assert (colours[mesh.vertices[:, 2] < 0, :3] == [30, 200, 40]).all()


def test_unposed_photos_add_their_hull_rendered_in_groups_at_training_cameras(tmp_path: Path) -> None:
    """Photos alone train only the 2D mode; their visual hull's renders add 4-view groups."""
    truth = write_views(tmp_path, n_views=4, rgba=False)
    module = datamodule(tmp_path, mesh_views=8)
    subject = module.subject
    assert subject.source == "images + hull views" and subject.mode == "multi-view + single views"
    assert subject.singles == subject.unposed == [0, 1, 2, 3] and subject.groups == [[4, 5, 6, 7], [8, 9, 10, 11]]
    # The hull renders show an object framed like the photos (the training renders' framing).
    coverage = (subject.alpha > 0.5).float().mean(dim=(1, 2))
    assert float(coverage[4:].mean()) == pytest.approx(float((truth["alpha"] > 0.5).float().mean()), rel=0.5)
    # Its colours are the subject's: red above, blue below (the hull is coloured from the photos).
    hull = subject.rgb[4:][subject.alpha[4:] > 0.9]
    assert float(hull[:, 0].max()) > 0.6 and float(hull[:, 2].max()) > 0.6
    # Batches: the photos without a camera (zeros), the hull views with theirs.
    module.setup("fit")
    batches = [module.train_set[i] for i in range(40)]
    singles = [b for b in batches if b["num_views"] == 1]
    groups = [b for b in batches if b["num_views"] == 4]
    assert singles and groups
    assert all(float(b["camera"].abs().sum()) == 0.0 for b in singles)
    assert all(bool((b["camera"].abs().sum(dim=1) > 0).all()) for b in groups)


def test_unposed_views_must_be_a_known_choice(tmp_path: Path) -> None:
    write_views(tmp_path, n_views=2)
    with pytest.raises(UserError, match="data.unposed_views"):
        datamodule(tmp_path, unposed_views="guess")
