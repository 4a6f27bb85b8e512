"""Subject meshes: load any mesh file into the canonical pose and render it like the training data.

A subject mesh (obj, glb/gltf, ply, stl, off) is turned z-up, centred and scaled so its largest side
is :data:`CANONICAL_EXTENT` (the procedural assets' size inside [-0.5, 0.5]^3); an uncoloured mesh
gets one colour. :func:`render_mesh` draws it with the procedural renderer's shading (Lambert +
ambient, light fixed to the camera, 2x2 supersampling), so rendered subject images look like the
images the multi-view model was trained on.

The rasteriser is the project's pure-PyTorch 2D one (:mod:`threestudio_mv.utils.rasterize`)
plus a depth test: the GPU rasterisers (nvdiffrast, OpenGL) are not available on CPU.
"""
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from threestudio_mv.data.procedural.render import resolve_supersamples
from threestudio_mv.utils.rasterize import rasterize_triangles_2d
from threestudio_mv.utils import camera
from threestudio_mv.utils.camera import CameraLight
from threestudio_mv.utils.errors import UserError

MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")
#: Largest side of a normalised subject, as the procedural assets (~0.85-0.95) in [-0.5, 0.5]^3.
CANONICAL_EXTENT = 0.9
UP_AXES = ("+z", "+y")
# +y up (glTF, most OBJ exporters), front +z -> our z-up world with the front at +x.
_Y_UP_TO_Z_UP = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
_NEAR = 1e-3


def parse_colour(value: str) -> Tuple[float, float, float]:
    """A colour name of the procedural palette ("brown") or ``#rrggbb`` -> RGB in [0, 1]."""
    from threestudio_mv.data.procedural.colours import NAMED_COLOURS

    text = value.strip().lower()
    if text in NAMED_COLOURS:
        return tuple(float(c) for c in NAMED_COLOURS[text])
    if len(text) == 7 and text.startswith("#"):
        try:
            return tuple(int(text[i : i + 2], 16) / 255.0 for i in (1, 3, 5))
        except ValueError:
            pass
    raise UserError(
        f"colour '{value}' is neither a colour name ({', '.join(sorted(NAMED_COLOURS))}) nor #rrggbb"
    )


def mesh_vertex_colours(mesh) -> Optional[np.ndarray]:
    """Per-vertex RGBA uint8 (V, 4) of a mesh's own colours (textures sampled at the vertices by
    trimesh), or None when it has none: no visual, or one flat gray, which is what trimesh makes up
    for a file whose material is missing (e.g. an OBJ whose .mtl is not beside it)."""
    visual = mesh.visual
    if visual.kind is None:
        return None
    if visual.kind == "texture":  # sampled at the vertices; colour visuals (PLY, our exports) have them already
        visual = visual.to_color()
    colours = np.asarray(visual.vertex_colors, dtype=np.uint8)
    rgb = colours[:, :3].astype(np.int32)
    flat = int(rgb.max() - rgb.min()) <= 4
    gray = int((rgb.max(axis=1) - rgb.min(axis=1)).max()) <= 4
    return None if flat and gray else colours


def load_subject_mesh(path: Path, up_axis: str = "+z", colour: Sequence[float] = (0.6, 0.6, 0.6)):
    """Load a mesh file as one ``trimesh.Trimesh`` in canonical pose with per-vertex colours.

    ``up_axis`` is the file's up axis for obj/ply/stl/off ("+z" or "+y", front then +x or +z); glTF
    files are always +y up (the glTF convention). Textures are sampled per vertex (trimesh); meshes
    without colours (see :func:`mesh_vertex_colours`) get ``colour``. Raises a UserError naming the file when it cannot be used.
    """
    import trimesh

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise UserError(f"'{path}' is not a mesh file ({', '.join(MESH_SUFFIXES)})")
    if up_axis not in UP_AXES:
        raise UserError(f"config key 'data.mesh_up_axis' must be one of {', '.join(UP_AXES)}, got '{up_axis}'")
    try:
        mesh = trimesh.load(str(path), force="mesh", process=False)
    except (ValueError, KeyError, IndexError, OSError, TypeError) as error:
        raise UserError(f"cannot read mesh '{path}' ({type(error).__name__}: {error})") from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise UserError(f"mesh '{path}' has no triangles")
    vertex_colours = mesh_vertex_colours(mesh)
    if vertex_colours is None:
        rgb = np.round(np.clip(np.asarray(colour, dtype=np.float64), 0.0, 1.0) * 255.0)
        vertex_colours = np.tile(np.append(rgb, 255.0).astype(np.uint8), (len(mesh.vertices), 1))
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    if suffix in (".glb", ".gltf") or up_axis == "+y":
        vertices = vertices @ _Y_UP_TO_Z_UP.T
    return canonical_mesh(trimesh.Trimesh(vertices=vertices, faces=np.asarray(mesh.faces), vertex_colors=vertex_colours, process=False), str(path))


def canonical_mesh(mesh, name: str = "mesh"):
    """A z-up vertex-coloured ``trimesh.Trimesh`` centred on its box, its largest side CANONICAL_EXTENT
    (as the procedural assets); a UserError naming ``name`` when it spans no volume."""
    import trimesh

    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    extent = float((hi - lo).max())
    if not np.isfinite(extent) or extent <= 0.0:
        raise UserError(f"mesh '{name}' is degenerate (its vertices span no volume)")
    vertices = (vertices - 0.5 * (lo + hi)) * (CANONICAL_EXTENT / extent)
    return trimesh.Trimesh(vertices=vertices, faces=np.asarray(mesh.faces), vertex_colors=mesh.visual.vertex_colors, process=False)


def _render_view(
    vertices: Tensor, faces: Tensor, colours: Tensor, normals: Tensor, c2w: Tensor, fovy: Tensor,
    resolution: int, light: CameraLight,
) -> Tuple[Tensor, Tensor]:
    """One camera at ``resolution``^2 sub-pixels: hit mask (R, R) and shaded colour (R, R, 3)."""
    projected = camera.project_points(vertices, c2w, fovy, resolution, resolution)
    depth = projected[:, 2]
    visible = (depth[faces] > _NEAR).all(dim=1)
    face_ids = torch.nonzero(visible).squeeze(1)
    triangles = projected[faces[face_ids], :2]
    face, row, col, bary = rasterize_triangles_2d(triangles, resolution, resolution)
    hit = torch.zeros(resolution * resolution, dtype=torch.bool)
    colour = torch.zeros(resolution * resolution, 3)
    if face.numel() == 0:
        return hit.view(resolution, resolution), colour.view(resolution, resolution, 3)
    corners = faces[face_ids[face]]  # (K, 3) vertex ids
    # Screen-space barycentrics -> perspective-correct ones (interpolate 1/z linearly on screen).
    weighted = bary / depth[corners]
    inverse_depth = weighted.sum(dim=1)
    perspective = weighted / inverse_depth[:, None]
    pixel = row * resolution + col
    fragment_depth = 1.0 / inverse_depth
    nearest = torch.full((resolution * resolution,), float("inf")).scatter_reduce(0, pixel, fragment_depth, "amin")
    front = fragment_depth <= nearest[pixel]
    pixel, corners, perspective = pixel[front], corners[front], perspective[front]
    albedo = (perspective[:, :, None] * colours[corners]).sum(dim=1)
    normal = torch.nn.functional.normalize((perspective[:, :, None] * normals[corners]).sum(dim=1), dim=-1)
    points = (perspective[:, :, None] * vertices[corners]).sum(dim=1)
    # Two-sided: a normal facing away from the camera is flipped (meshes with mixed winding).
    to_camera = c2w[:3, 3] - points
    normal = torch.where(((normal * to_camera).sum(dim=-1) < 0)[:, None], -normal, normal)
    shade = light.shade(normal, c2w[:3, :3])
    hit[pixel] = True
    colour[pixel] = (albedo * shade[:, None]).clamp(0.0, 1.0)
    return hit.view(resolution, resolution), colour.view(resolution, resolution, 3)


def render_mesh(
    mesh,
    c2w: Tensor,
    fovy: Tensor,
    size: int,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    light: Optional[CameraLight] = None,
    supersample: int = 2,
) -> Dict[str, Tensor]:
    """Render a vertex-coloured mesh from cameras c2w (B, 4, 4) with vertical FOV ``fovy`` (B,) degrees.

    Returns (B, S, S, ...) float tensors on the CPU, as the procedural renderer: ``rgb`` composited
    over ``background``, ``rgb_fg`` straight colour (0 where empty) and ``alpha`` coverage.
    """
    light = light or CameraLight()
    vertices = torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float32))
    faces = torch.from_numpy(np.asarray(mesh.faces, dtype=np.int64))
    colours = torch.from_numpy(np.asarray(mesh.visual.vertex_colors[:, :3], dtype=np.float32) / 255.0)
    normals = torch.from_numpy(np.asarray(mesh.vertex_normals, dtype=np.float32))
    c2w = c2w.detach().float().cpu()
    fovy = torch.as_tensor(fovy, dtype=torch.float32).reshape(-1).expand(c2w.shape[0])
    resolution = size * supersample
    views = [_render_view(vertices, faces, colours, normals, c2w[view], fovy[view], resolution, light) for view in range(c2w.shape[0])]
    hit = torch.stack([h for h, _ in views])
    colour = torch.stack([c for _, c in views])
    resolved = resolve_supersamples(hit, colour, size, supersample, torch.tensor(background, dtype=torch.float32))
    return {key: resolved[key] for key in ("rgb", "rgb_fg", "alpha")}
