"""Evaluation metrics: shape (Chamfer-L1, volumetric IoU), colour (CIELAB delta-E), images (PSNR,
SSIM, silhouette IoU) and helpers (colour names, foreground masks, loading an export).

Conventions: colours are sRGB in [0, 1]; images are (H, W, C) float in [0, 1] (NumPy or torch);
callables (an SDF, an albedo function) take a torch tensor of points (N, 3) and return a tensor
((N,) distances negative inside, or (N, 3) colours).
"""
import math
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree
from skimage.color import deltaE_cie76, rgb2lab

from threestudio_mv.data.foreground import border_pixels
from threestudio_mv.models.exporters.mesh_exporter import WORLD_TO_GLTF

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]
PointFn = Callable[[torch.Tensor], torch.Tensor]
Bounds = Tuple[Sequence[float], Sequence[float]]


def _numpy(value: ArrayLike) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _call_on_points(fn: PointFn, points: np.ndarray, chunk_size: int = 1 << 16) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    with torch.no_grad():
        return np.concatenate([_numpy(fn(chunk)) for chunk in tensor.split(chunk_size)])


# ------------------------------------------------------------------------------------------ shape
def chamfer_l1(pred: trimesh.Trimesh, gt: trimesh.Trimesh, n_points: int = 20000, seed: int = 0) -> float:
    """Symmetric Chamfer-L1: the mean nearest-neighbour distance between surface samples, averaged
    over both directions, divided by the GT bounding-box diagonal (so 0.01 = 1% of the object).

    Both surfaces are sampled with the same ``seed``, so identical meshes score exactly 0.
    """
    pred_points, _ = trimesh.sample.sample_surface(pred, n_points, seed=seed)
    gt_points, _ = trimesh.sample.sample_surface(gt, n_points, seed=seed)
    pred_to_gt, _ = cKDTree(gt_points).query(pred_points)
    gt_to_pred, _ = cKDTree(pred_points).query(gt_points)
    diagonal = float(np.linalg.norm(gt.bounds[1] - gt.bounds[0]))
    return float(0.5 * (pred_to_gt.mean() + gt_to_pred.mean()) / diagonal)


def grid_points(bounds: Bounds, resolution: Union[int, Sequence[int]]) -> np.ndarray:
    """Centres of a grid of ``resolution`` cells per axis (one number, or one per axis) over
    ``bounds`` (lo, hi): (Rx, Ry, Rz, 3), index order x, y, z."""
    lo, hi = np.asarray(bounds[0], dtype=np.float64), np.asarray(bounds[1], dtype=np.float64)
    counts = [resolution] * 3 if isinstance(resolution, int) else list(resolution)
    axes = [lo[k] + (np.arange(counts[k]) + 0.5) * (hi[k] - lo[k]) / counts[k] for k in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def reference_lattice(reference: Bounds, cover: Bounds, resolution: int) -> Tuple[Bounds, Tuple[int, int, int]]:
    """A grid of cubic cells fixed by ``reference`` (a ground truth's bounds: ``resolution`` cells
    across its longest side, anchored at its corner), extended by whole cells to cover ``cover``.

    Scoring every prediction of one ground truth on the same cells keeps the IoU from moving with the
    prediction's own bounding box: on a grid stretched over each prediction's bounds, the sampling
    alone moved a 64^3 IoU by +-0.007 (more than the differences between the methods compared).
    """
    lo, hi = np.asarray(reference[0], dtype=np.float64), np.asarray(reference[1], dtype=np.float64)
    cell = float((hi - lo).max()) / resolution
    start = lo + np.floor((np.asarray(cover[0], dtype=np.float64) - lo) / cell) * cell
    counts = np.ceil((np.asarray(cover[1], dtype=np.float64) - start) / cell).astype(int).clip(min=1)
    return (start, start + counts * cell), (int(counts[0]), int(counts[1]), int(counts[2]))


def mesh_occupancy(mesh: trimesh.Trimesh, bounds: Bounds, resolution: Union[int, Sequence[int]]) -> np.ndarray:
    """Which centres of a grid (``grid_points``) over ``bounds`` lie inside ``mesh``: bool (Rx, Ry, Rz).

    The generalised winding number (libigl's fast winding numbers, Barill et al. 2018) > 0.5: exact
    for closed meshes and graceful around holes, so generated meshes that are not watertight get a
    sensible answer too.
    """
    import igl

    grid = grid_points(bounds, resolution)
    points = grid.reshape(-1, 3)
    vertices = np.ascontiguousarray(mesh.vertices, dtype=np.float64)
    faces = np.ascontiguousarray(mesh.faces, dtype=np.int64)
    if len(faces) == 0:
        return np.zeros(grid.shape[:3], dtype=bool)
    winding = igl.fast_winding_number(vertices, faces, points)
    return (np.abs(winding) > 0.5).reshape(grid.shape[:3])


def volumetric_iou(
    pred: trimesh.Trimesh,
    gt: Union[trimesh.Trimesh, PointFn],
    resolution: Union[int, Sequence[int]] = 64,
    bounds: Optional[Bounds] = None,
) -> float:
    """Intersection over union of the occupied cells of a grid (``grid_points``; ``reference_lattice``
    makes one that stays put from one prediction to the next).

    ``gt`` is a mesh or an SDF callable (points (N, 3) -> (N,), negative inside). ``bounds``
    defaults to the union of both bounding boxes; it is required when ``gt`` is an SDF.
    """
    if bounds is None:
        if not isinstance(gt, trimesh.Trimesh):
            raise ValueError("volumetric_iou: pass bounds=(lo, hi) when gt is an SDF callable")
        bounds = (np.minimum(pred.bounds[0], gt.bounds[0]), np.maximum(pred.bounds[1], gt.bounds[1]))
    pred_inside = mesh_occupancy(pred, bounds, resolution)
    if isinstance(gt, trimesh.Trimesh):
        gt_inside = mesh_occupancy(gt, bounds, resolution)
    else:
        points = grid_points(bounds, resolution).reshape(-1, 3)
        gt_inside = (_call_on_points(gt, points).reshape(-1) < 0).reshape(pred_inside.shape)
    union = np.logical_or(pred_inside, gt_inside).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred_inside, gt_inside).sum() / union)


# ----------------------------------------------------------------------------------------- colour
def _sample_texture(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup of an (H, W, C) image at UVs with v = 0 at the image bottom (OBJ/glTF as
    loaded by trimesh); texel centres at (index + 0.5) / size."""
    height, width = image.shape[:2]
    x = np.mod(uv[:, 0], 1.0) * width - 0.5
    y = (1.0 - np.mod(uv[:, 1], 1.0)) * height - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    x1, y1 = np.clip(x0 + 1, 0, width - 1), np.clip(y0 + 1, 0, height - 1)
    x0, y0 = np.clip(x0, 0, width - 1), np.clip(y0, 0, height - 1)
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def surface_colours(mesh: trimesh.Trimesh, points: np.ndarray, face_index: np.ndarray) -> np.ndarray:
    """Colour (N, 3) in [0, 1] of ``mesh`` at surface ``points`` lying on faces ``face_index``.

    Textured meshes are sampled at the interpolated UV (bilinear); vertex colours are interpolated
    barycentrically; face colours are looked up.
    """
    visual = mesh.visual
    kind = visual.kind
    if kind == "texture":
        bary = trimesh.triangles.points_to_barycentric(mesh.triangles[face_index], points)
        uv = (np.asarray(visual.uv)[mesh.faces[face_index]] * bary[:, :, None]).sum(axis=1)
        material = visual.material
        image = getattr(material, "image", None)
        if image is None:
            image = getattr(material, "baseColorTexture", None)
        if image is None:
            return np.tile(np.asarray(material.main_color[:3], dtype=np.float64) / 255.0, (len(points), 1))
        array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
        return _sample_texture(array, uv)
    if kind == "vertex":
        bary = trimesh.triangles.points_to_barycentric(mesh.triangles[face_index], points)
        colours = np.asarray(visual.vertex_colors[:, :3], dtype=np.float64)[mesh.faces[face_index]] / 255.0
        return (colours * bary[:, :, None]).sum(axis=1)
    if kind == "face":
        return np.asarray(visual.face_colors[face_index, :3], dtype=np.float64) / 255.0
    raise ValueError("surface_colours: the mesh has no colours (no texture, vertex or face colours)")


def sample_coloured_surface(mesh: trimesh.Trimesh, n_points: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Random surface points (N, 3) of a coloured mesh and their colours (N, 3) in [0, 1]."""
    points, face_index = trimesh.sample.sample_surface(mesh, n_points, seed=seed)
    return points, surface_colours(mesh, points, face_index)


def surface_colour_error(
    pred: trimesh.Trimesh,
    gt: Union[trimesh.Trimesh, PointFn],
    n_points: int = 10000,
    gt_geometry: Optional[trimesh.Trimesh] = None,
    seed: int = 0,
) -> float:
    """Mean CIELAB delta-E (CIE76) between the predicted surface colour and the ground truth.

    Points are sampled on ``pred``'s surface. ``gt`` is a coloured mesh (its colour at the nearest of
    dense surface samples) or an albedo function of points, evaluated at the nearest point of
    ``gt_geometry``'s surface when given, else at the predicted points themselves.
    """
    points, pred_colours = sample_coloured_surface(pred, n_points, seed)
    if isinstance(gt, trimesh.Trimesh):
        gt_points, gt_colours = sample_coloured_surface(gt, max(4 * n_points, 50000), seed + 1)
        _, nearest = cKDTree(gt_points).query(points)
        target = gt_colours[nearest]
    else:
        query = points
        if gt_geometry is not None:
            surface, _ = trimesh.sample.sample_surface(gt_geometry, max(4 * n_points, 50000), seed=seed + 1)
            _, nearest = cKDTree(surface).query(points)
            query = surface[nearest]
        target = _call_on_points(gt, query)
    delta = deltaE_cie76(rgb2lab(np.clip(pred_colours, 0, 1)[None]), rgb2lab(np.clip(target, 0, 1)[None]))
    return float(delta.mean())


# ----------------------------------------------------------------------------------------- images
def _image(value: ArrayLike) -> np.ndarray:
    return np.clip(_numpy(value).astype(np.float64), 0.0, 1.0)


def psnr(pred: ArrayLike, target: ArrayLike) -> float:
    """Peak signal-to-noise ratio (dB) of images in [0, 1]; identical images give inf."""
    from skimage.metrics import peak_signal_noise_ratio

    pred_np, target_np = _image(pred), _image(target)
    if np.array_equal(pred_np, target_np):
        return math.inf
    return float(peak_signal_noise_ratio(target_np, pred_np, data_range=1.0))


def ssim(pred: ArrayLike, target: ArrayLike) -> float:
    """Structural similarity of (H, W[, C]) images in [0, 1] (skimage, 7x7 window)."""
    from skimage.metrics import structural_similarity

    pred_np, target_np = _image(pred), _image(target)
    channel_axis = -1 if pred_np.ndim == 3 else None
    return float(structural_similarity(target_np, pred_np, data_range=1.0, channel_axis=channel_axis))


def silhouette_iou(mask_a: ArrayLike, mask_b: ArrayLike) -> float:
    """IoU of two masks (bool, or float thresholded at 0.5); two empty masks give 1."""
    a, b = _numpy(mask_a) > 0.5, _numpy(mask_b) > 0.5
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def foreground_mask(
    image: ArrayLike, background: Optional[Sequence[float]] = (1.0, 1.0, 1.0), threshold: float = 0.1, despeckle: bool = False
) -> np.ndarray:
    """Pixels of an (H, W, 3|4) image (floats in [0, 1]) on a plain background that differ from it:
    bool (H, W). The one foreground rule of the evaluations.

    RGBA images use alpha > 0.5; otherwise a pixel is foreground when some channel differs from
    ``background`` by more than ``threshold``; ``background`` None estimates it as the median of the
    border pixels (a generated view's background need not be white). ``despeckle`` applies a 3x3
    median filter, which removes isolated speckle.
    """
    array = _numpy(image).astype(np.float64)
    if array.shape[-1] == 4:
        return array[..., 3] > 0.5
    rgb = array[..., :3]
    if background is None:
        colour = np.median(border_pixels(rgb, width=1), axis=0)
    else:
        colour = np.asarray(background, dtype=np.float64)
    mask = np.abs(rgb - colour).max(axis=-1) > threshold
    if despeckle:
        from scipy.ndimage import median_filter

        mask = median_filter(mask.astype(np.uint8), size=3, mode="constant").astype(bool)
    return mask


def image_delta_e(pred: ArrayLike, target: ArrayLike, mask: ArrayLike) -> float:
    """Mean CIE76 delta-E between two (H, W, 3) images in [0, 1] over the bool ``mask`` (H, W); nan if empty."""
    mask_np = _numpy(mask).astype(bool)
    if not mask_np.any():
        return float("nan")
    delta = deltaE_cie76(rgb2lab(_image(pred)), rgb2lab(_image(target)))
    return float(delta[mask_np].mean())


def view_scores(pred: ArrayLike, pred_mask: ArrayLike, target: ArrayLike, target_mask: ArrayLike) -> Dict[str, float]:
    """Generated views against true ones, mean over N views: PSNR, SSIM, silhouette IoU, colour delta-E over
    the true foreground (``delta_e``) and over the pixels both call foreground (``delta_e_overlap``).
    ``pred``, ``target``: (N, H, W, 3) in [0, 1] over the same background; masks: (N, H, W) bool."""
    rows = []
    for p, pm, t, tm in zip(_numpy(pred), _numpy(pred_mask) > 0.5, _numpy(target), _numpy(target_mask) > 0.5, strict=True):
        rows.append({"psnr": psnr(p, t), "ssim": ssim(p, t), "silhouette_iou": silhouette_iou(pm, tm),
                     "delta_e": image_delta_e(p, t, tm), "delta_e_overlap": image_delta_e(p, t, pm & tm)})
    return {key: float(np.nanmean([row[key] for row in rows])) for key in rows[0]}


# ----------------------------------------------------------------------------------------- loading
def mesh_from_export(export_dir: Union[str, Path]) -> trimesh.Trimesh:
    """Load an exporter folder as one coloured mesh in world coordinates (z up).

    Prefers ``model.obj`` (textured or vertex-coloured); falls back to ``model.glb``, turning it
    back from glTF's y-up axes.
    """
    export_dir = Path(export_dir)
    obj, glb = export_dir / "model.obj", export_dir / "model.glb"
    if obj.is_file():
        return trimesh.load(obj, force="mesh", process=False)
    if glb.is_file():
        mesh = trimesh.load(glb, force="mesh", process=False)
        mesh.vertices = np.asarray(mesh.vertices) @ WORLD_TO_GLTF
        return mesh
    raise FileNotFoundError(f"{export_dir} holds neither model.obj nor model.glb")


def mesh_quality(mesh: trimesh.Trimesh) -> Dict[str, Any]:
    """Topology and smoothness of a mesh, its vertices welded first (UV seams split an export's):
    ``largest_piece_area`` (fraction of the area in the largest connected piece), ``pieces``,
    ``watertight`` and ``mean_normal_angle_deg`` (mean angle between the normals of adjacent faces)."""
    welded = trimesh.Trimesh(vertices=np.asarray(mesh.vertices), faces=np.asarray(mesh.faces), process=False)
    welded.merge_vertices(merge_tex=True, merge_norm=True)
    labels = trimesh.graph.connected_component_labels(welded.face_adjacency, node_count=len(welded.faces))
    areas = np.bincount(labels, weights=welded.area_faces)
    angles = welded.face_adjacency_angles
    return {
        "largest_piece_area": float(areas.max() / areas.sum()) if areas.sum() > 0 else 0.0,
        "pieces": int(len(areas)),
        "watertight": bool(welded.is_watertight),
        "mean_normal_angle_deg": float(np.degrees(angles).mean()) if len(angles) else 0.0,
    }
