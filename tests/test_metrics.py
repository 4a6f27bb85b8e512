"""Evaluation metrics: known answers for shapes, colours and images."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from threestudio_mv.eval.metrics import (
    chamfer_l1,
    foreground_mask,
    mesh_from_export,
    mesh_occupancy,
    reference_lattice,
    psnr,
    silhouette_iou,
    ssim,
    surface_colour_error,
    view_scores,
    volumetric_iou,
)
from threestudio_mv.data.procedural.colours import nearest_colour_name
from threestudio_mv.models.exporters.mesh_exporter import export_textured_mesh


def sphere(radius: float = 0.5, subdivisions: int = 4) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)


def coloured(mesh: trimesh.Trimesh, rgb) -> trimesh.Trimesh:
    mesh = mesh.copy()
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.tile(np.append(np.asarray(rgb) * 255, 255), (len(mesh.vertices), 1)).astype(np.uint8))
    return mesh


def position_colour(points: torch.Tensor) -> torch.Tensor:
    return (points + 0.5).clamp(0, 1)


def test_identical_meshes_score_perfectly() -> None:
    mesh = coloured(sphere(), (0.8, 0.3, 0.1))
    assert chamfer_l1(mesh, mesh) == 0.0
    assert volumetric_iou(mesh, mesh, resolution=32) == 1.0
    assert surface_colour_error(mesh, mesh, n_points=2000) == pytest.approx(0.0, abs=1e-6)


def test_sphere_against_a_ten_percent_larger_sphere() -> None:
    small, large = sphere(0.5), sphere(0.55)
    assert volumetric_iou(small, large, resolution=64) == pytest.approx(1 / 1.1**3, abs=0.03)
    # Every point of one surface lies 0.05 from the other; diagonal of the GT box = sqrt(3).
    assert chamfer_l1(large, small) == pytest.approx(0.05 / math.sqrt(3), rel=0.05)
    sdf = lambda p: p.norm(dim=-1) - 0.55  # noqa: E731
    assert volumetric_iou(small, sdf, resolution=64, bounds=([-0.6] * 3, [0.6] * 3)) == pytest.approx(1 / 1.1**3, abs=0.03)
    with pytest.raises(ValueError, match="bounds"):
        volumetric_iou(small, sdf)


def test_occupancy_of_a_box_and_of_a_mesh_with_holes() -> None:
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))  # faces split along diagonals through cell centres
    assert mesh_occupancy(box, ([-1.0] * 3, [1.0] * 3), 16).mean() == pytest.approx(1 / 8)
    closed = sphere(0.5, subdivisions=3)
    holed = closed.copy()
    holed.update_faces(np.arange(len(holed.faces)) % 20 != 0)
    assert not holed.is_watertight
    assert volumetric_iou(holed, closed, resolution=32) > 0.98


def test_reference_lattice_scores_a_prediction_on_cells_that_do_not_move_with_its_bounds() -> None:
    gt_sdf = lambda p: p.norm(dim=-1) - 0.5  # noqa: E731
    gt_bounds = ([-0.5] * 3, [0.5] * 3)
    pred = sphere(0.46, subdivisions=4)
    speck = trimesh.creation.icosphere(subdivisions=1, radius=0.005)
    speck.apply_translation([0.9, 0.0, 0.0])  # stretches the prediction's box by 40% along x, adds ~no volume
    with_speck = trimesh.util.concatenate([pred, speck])

    def on_lattice(mesh: trimesh.Trimesh) -> float:
        union = (np.minimum(mesh.bounds[0], gt_bounds[0]), np.maximum(mesh.bounds[1], gt_bounds[1]))
        bounds, cells = reference_lattice(gt_bounds, union, 32)
        assert cells[1] == cells[2] == 32 and cells[0] == (32 if mesh is pred else 45)  # 0.4 more of 1.0 along x
        return volumetric_iou(mesh, gt_sdf, resolution=cells, bounds=bounds)

    def stretched(mesh: trimesh.Trimesh) -> float:
        union = (np.minimum(mesh.bounds[0], gt_bounds[0]), np.maximum(mesh.bounds[1], gt_bounds[1]))
        return volumetric_iou(mesh, gt_sdf, resolution=32, bounds=union)

    assert on_lattice(with_speck) == pytest.approx(on_lattice(pred), abs=1e-3)
    assert abs(stretched(with_speck) - stretched(pred)) > 3e-3  # the old per-prediction grid moved


def test_colour_error_is_large_for_red_against_blue() -> None:
    red, blue = coloured(sphere(), (1.0, 0.0, 0.0)), coloured(sphere(), (0.0, 0.0, 1.0))
    assert surface_colour_error(red, blue, n_points=2000) > 100.0  # CIE76 red-blue is ~176
    assert surface_colour_error(red, lambda p: torch.tensor([[1.0, 0.0, 0.0]]).expand(len(p), 3), n_points=1000) < 1e-3


def test_textured_export_matches_its_colour_function(tmp_path: Path) -> None:
    mesh = sphere(0.5, subdivisions=3)
    export_textured_mesh(
        torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces), position_colour, tmp_path,
        texture_size=256, save_glb=True,
    )
    loaded = mesh_from_export(tmp_path)
    assert loaded.visual.kind == "texture"
    assert surface_colour_error(loaded, position_colour, n_points=2000, gt_geometry=mesh) < 3.0
    assert chamfer_l1(loaded, mesh) < 1e-3
    (tmp_path / "model.obj").unlink()  # the GLB alone comes back in world coordinates too
    from_glb = mesh_from_export(tmp_path)
    assert np.allclose(from_glb.bounds, mesh.bounds, atol=1e-5)
    assert surface_colour_error(from_glb, position_colour, n_points=2000) < 3.0


def test_image_metrics() -> None:
    image = np.random.default_rng(0).random((32, 32, 3))
    assert psnr(image, image) == math.inf
    assert psnr(np.full((8, 8, 3), 0.5), np.full((8, 8, 3), 0.6)) == pytest.approx(20.0, abs=1e-6)
    assert ssim(image, image) == pytest.approx(1.0)
    assert ssim(torch.tensor(image), torch.tensor(1 - image)) < 0.5
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:, :2], b[:, 1:3] = True, True
    assert silhouette_iou(a, b) == pytest.approx(4 / 12)
    assert silhouette_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_colour_names_and_foreground_masks() -> None:
    palette = {"red": (1.0, 0.0, 0.0), "green": (0.0, 0.6, 0.0), "blue": (0.0, 0.0, 1.0)}
    assert nearest_colour_name((0.8, 0.15, 0.1), palette=palette) == "red"
    assert nearest_colour_name(torch.tensor([0.1, 0.2, 0.7]), palette=palette) == "blue"
    image = np.ones((10, 10, 3))
    image[2:5, 3:8] = (0.2, 0.5, 0.9)
    expected = np.zeros((10, 10), bool)
    expected[2:5, 3:8] = True
    assert np.array_equal(foreground_mask(image), expected)
    rgba = np.concatenate([image, expected[..., None].astype(float)], axis=-1)
    assert np.array_equal(foreground_mask(rgba), expected)


def test_foreground_mask_estimates_a_coloured_background_and_despeckles():
    image = np.full((16, 16, 3), 0.5)  # gray background
    image[4:12, 4:12] = (0.9, 0.1, 0.1)  # the object
    image[1, 13] = (0.0, 0.0, 0.0)  # one speck
    assert foreground_mask(image).all()  # against white, everything differs
    estimated = foreground_mask(image, background=None)
    assert estimated[4:12, 4:12].all() and estimated.sum() == 64 + 1
    cleaned = foreground_mask(image, background=None, despeckle=True)
    assert not cleaned[1, 13] and cleaned[5:11, 5:11].all()


def test_view_scores_of_identical_and_recoloured_views() -> None:
    views = np.ones((2, 16, 16, 3))
    masks = np.zeros((2, 16, 16), dtype=bool)
    masks[:, 4:12, 4:12] = True
    views[masks] = [0.8, 0.1, 0.1]
    same = view_scores(views, masks, views, masks)
    assert same["silhouette_iou"] == 1.0 and same["delta_e"] == 0.0 and same["psnr"] == float("inf")
    recoloured = views.copy()
    recoloured[masks] = [0.1, 0.1, 0.8]
    shifted = np.roll(masks, 4, axis=2)
    scores = view_scores(recoloured, shifted, views, masks)
    assert scores["delta_e"] > 50.0 and scores["silhouette_iou"] < 0.5 and scores["ssim"] < same["ssim"]
    assert scores["delta_e_overlap"] > 50.0
