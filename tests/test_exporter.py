"""Mesh exporter: UV rasteriser, texture bake (UV orientation!), OBJ/MTL/PNG, GLB, vertex colours."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import trimesh

import threestudio_mv
from threestudio_mv.models.exporters.mesh_exporter import WORLD_TO_GLTF, MeshExporter, export_textured_mesh
from threestudio_mv.utils.rasterize import rasterize_triangles_2d
from threestudio_mv.utils.errors import UserError


def colour_of(points: torch.Tensor) -> torch.Tensor:
    """A colour that varies along every axis, so a flipped or shifted UV shows up."""
    return (points + 0.5).clamp(0.0, 1.0)


@pytest.fixture(scope="module")
def sphere() -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=3, radius=0.5)


def tensors(mesh: trimesh.Trimesh) -> tuple:
    return torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces, dtype=torch.long)


def texture_at(image: np.ndarray, uv: np.ndarray, flip_v: bool = False) -> np.ndarray:
    """Nearest-texel lookup with the OBJ convention (v = 0 at the image bottom)."""
    height, width = image.shape[:2]
    v = uv[:, 1] if flip_v else 1.0 - uv[:, 1]
    cols = np.clip((uv[:, 0] * width).astype(int), 0, width - 1)
    rows = np.clip((v * height).astype(int), 0, height - 1)
    return image[rows, cols, :3] / 255.0


def test_rasteriser_covers_each_cell_once_with_exact_barycentrics() -> None:
    # Two triangles tiling an 8x8 grid, their shared diagonal through cell centres.
    triangles = torch.tensor([[[0, 0], [8, 0], [8, 8]], [[0, 0], [8, 8], [0, 8]]], dtype=torch.float64)
    face, row, col, bary = rasterize_triangles_2d(triangles, 8, 8)
    coverage = torch.zeros(8, 8).index_put_((row, col), torch.ones(len(row)), accumulate=True)
    assert torch.equal(coverage, torch.ones(8, 8))
    centres = (bary[:, :, None] * triangles[face]).sum(dim=1)
    assert torch.allclose(centres, torch.stack([col + 0.5, row + 0.5], dim=-1).double())
    # Clockwise input gives the same cells, weights still in input vertex order.
    face2, row2, col2, bary2 = rasterize_triangles_2d(triangles[:, [0, 2, 1]], 8, 8)
    assert len(face2) == 64
    assert torch.allclose((bary2[:, :, None] * triangles[:, [0, 2, 1]][face2]).sum(1), torch.stack([col2 + 0.5, row2 + 0.5], -1).double())


def test_textured_obj_reproduces_the_colour_function(tmp_path: Path, sphere: trimesh.Trimesh) -> None:
    vertices, faces = tensors(sphere)
    files = export_textured_mesh(vertices, faces, colour_of, tmp_path, texture_size=256)
    assert {"obj", "mtl", "texture", "glb"} <= set(files)
    assert (tmp_path / "model.obj").is_file() and (tmp_path / "texture_kd.png").is_file()
    mtl = (tmp_path / "model.mtl").read_text()
    assert "newmtl" in mtl and "map_Kd texture_kd.png" in mtl
    assert "mtllib model.mtl" in (tmp_path / "model.obj").read_text()

    loaded = trimesh.load(tmp_path / "model.obj", force="mesh", process=False)
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals)
    image = np.asarray(loaded.visual.material.image.convert("RGB"))
    assert image.shape == (256, 256, 3)
    uv = np.asarray(loaded.visual.uv)
    expected = colour_of(torch.tensor(loaded.vertices, dtype=torch.float32)).numpy()
    assert np.abs(texture_at(image, uv) - expected).mean() < 0.05
    assert np.abs(texture_at(image, uv, flip_v=True) - expected).mean() > 0.1  # the check has teeth
    # Seams were dilated: no texel is left black although the colour is never black.
    assert (image.sum(axis=-1) > 0).all()


def test_glb_is_y_up_and_textured(tmp_path: Path, sphere: trimesh.Trimesh) -> None:
    vertices, faces = tensors(sphere)
    files = export_textured_mesh(vertices, faces, colour_of, tmp_path, texture_size=256, fmt="glb")
    assert set(files) == {"glb"}
    loaded = trimesh.load(files["glb"], force="mesh", process=False)
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals)
    image = np.asarray(loaded.visual.material.baseColorTexture.convert("RGB"))
    world = np.asarray(loaded.vertices) @ WORLD_TO_GLTF  # back to z-up
    expected = colour_of(torch.tensor(world, dtype=torch.float32)).numpy()
    assert np.abs(texture_at(image, np.asarray(loaded.visual.uv)) - expected).mean() < 0.05
    # The world's top (+z) is glTF's +y.
    top = np.asarray(sphere.vertices)[np.argmax(sphere.vertices[:, 2])]
    assert np.allclose((top @ WORLD_TO_GLTF.T)[1], 0.5, atol=1e-6)
    assert np.isclose(np.asarray(loaded.vertices)[:, 1].max(), 0.5, atol=1e-5)


def test_vertex_colour_mode(tmp_path: Path, sphere: trimesh.Trimesh) -> None:
    vertices, faces = tensors(sphere)
    files = export_textured_mesh(vertices, faces, colour_of, tmp_path, fmt="obj")
    assert set(files) == {"obj", "ply"}
    expected = colour_of(vertices).numpy()
    ply = trimesh.load(files["ply"], process=False)
    assert np.abs(ply.visual.vertex_colors[:, :3] / 255.0 - expected).max() <= 1.0 / 255 + 1e-6
    obj = trimesh.load(files["obj"], force="mesh", process=False)
    assert obj.visual.kind == "vertex"
    assert np.abs(obj.visual.vertex_colors[:, :3] / 255.0 - expected).max() <= 1.0 / 255 + 1e-3
    assert np.allclose(obj.vertices, sphere.vertices, atol=1e-5)


def test_registered_exporter_uses_geometry_and_material(tmp_path: Path, sphere: trimesh.Trimesh) -> None:
    vertices, faces = tensors(sphere)
    geometry = SimpleNamespace(
        isosurface=lambda: SimpleNamespace(vertices=vertices, faces=faces),
        export=lambda points: {"features": points},
    )
    material = SimpleNamespace(export=lambda features: {"albedo": colour_of(features)})
    exporter_cls = threestudio_mv.find("mesh-exporter")
    assert exporter_cls is MeshExporter
    exporter = exporter_cls({"texture_size": 128, "save_vertex_colors": True}, prefix="system.exporter")
    files = exporter(geometry, material, tmp_path / "export")
    assert {p.name for p in files.values()} == {"model.obj", "model.mtl", "texture_kd.png", "model.glb", "model_vertex_colors.ply"}
    assert all(p.is_file() for p in files.values())


def test_bad_options_and_empty_mesh_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"system\.exporter\.fmt"):
        MeshExporter({"fmt": "fbx"}, prefix="system.exporter")
    with pytest.raises(UserError, match=r"system\.exporter\.texture_format"):  # no such key (textures are PNG)
        MeshExporter({"texture_format": "jpg"}, prefix="system.exporter")
    with pytest.raises(UserError, match="empty"):
        export_textured_mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long), colour_of, tmp_path)


def test_large_meshes_are_decimated_before_unwrapping(tmp_path: Path) -> None:
    dense = trimesh.creation.icosphere(subdivisions=5, radius=0.5)  # 20480 faces
    vertices, faces = tensors(dense)
    written = export_textured_mesh(vertices, faces, colour_of, tmp_path, texture_size=128, save_glb=False, max_faces=2000)
    mesh = trimesh.load(written["obj"], force="mesh", process=False)
    assert 1000 <= len(mesh.faces) <= 2000
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(radii.mean() - 0.5) < 0.01  # the shape survives
    uv = mesh.visual.uv
    image = np.asarray(mesh.visual.material.image.convert("RGB"))
    centroids = mesh.triangles_center
    # The bake follows the decimated surface: texture at face centres matches the colour function.
    face_uv = uv[mesh.faces].mean(axis=1)
    error = np.abs(texture_at(image, face_uv) - colour_of(torch.tensor(centroids)).numpy()).mean()
    assert error < 0.05


def shell_colour(points: torch.Tensor) -> torch.Tensor:
    """Red inside radius 0.45, blue outside: tells a sample inside the 0.5 sphere from one on it."""
    inside = (points.norm(dim=-1, keepdim=True) < 0.45).float()
    return inside * torch.tensor([1.0, 0.0, 0.0]) + (1.0 - inside) * torch.tensor([0.0, 0.0, 1.0])


@pytest.mark.parametrize("fmt", ["obj-mtl", "obj"])
def test_colours_are_sampled_inside_the_surface_by_color_offset(tmp_path: Path, sphere: trimesh.Trimesh, fmt: str) -> None:
    vertices, faces = tensors(sphere)
    reds = []
    for offset in (0.0, 0.1):
        written = export_textured_mesh(vertices, faces, shell_colour, tmp_path / f"{offset}", fmt=fmt, texture_size=64,
                                       save_glb=False, color_offset=offset)
        mesh = trimesh.load(written["obj"], force="mesh", process=False)
        if fmt == "obj":
            colours = mesh.visual.vertex_colors[:, :3] / 255.0
        else:
            image = np.asarray(mesh.visual.material.image.convert("RGB"))
            colours = texture_at(image, mesh.visual.uv[mesh.faces].mean(axis=1))
        reds.append(colours[:, 0].mean())
    assert reds[0] < 0.05 and reds[1] > 0.95, reds  # on the surface: blue; 0.1 inside (r = 0.4): red
