"""Isosurface extraction from a scalar field (one place, shared by every geometry).

Marching cubes (scikit-image) on a grid restricted to a tight box around the occupied region, with
enclosed cavities filled and the field smoothed first (scipy.ndimage), then removal of small
connected components (trimesh). ``threshold="auto"`` picks the level whose
silhouettes match the field's rendered opacity; see :func:`auto_isosurface_level`.
"""
import math
from dataclasses import dataclass
from typing import Callable, Tuple, Union

import numpy as np
import torch
import trimesh
from skimage import measure
from torch import Tensor
from tqdm import tqdm

from threestudio_mv.utils.errors import UserError

FieldFn = Callable[[Tensor], Tensor]
Threshold = Union[float, int, str]


@dataclass
class IsosurfaceMesh:
    """A triangle mesh in world coordinates: ``vertices`` (V, 3) float, ``faces`` (F, 3) long.

    Faces are wound so that normals point out of the region where the field exceeds the level.
    """

    vertices: Tensor
    faces: Tensor
    level: float


def evaluate_on_grid(
    field_fn: FieldFn,
    bbox_min: Tensor,
    bbox_max: Tensor,
    resolution: int,
    chunk_size: int = 65536,
    desc: str = "isosurface field",
) -> np.ndarray:
    """The field at the (resolution,)*3 vertices of a grid spanning the box: (R, R, R) float32 in x, y, z order."""
    device = bbox_min.device
    axes = [torch.linspace(float(lo), float(hi), resolution, device=device) for lo, hi in zip(bbox_min, bbox_max)]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    values = []
    n_chunks = math.ceil(points.shape[0] / chunk_size)
    with torch.no_grad():
        for start in tqdm(range(0, points.shape[0], chunk_size), total=n_chunks, desc=desc, leave=False):
            values.append(field_fn(points[start : start + chunk_size]).reshape(-1).float().cpu())
    return torch.cat(values).reshape(resolution, resolution, resolution).numpy()


def auto_isosurface_level(
    volume: np.ndarray, spacing: Tuple[float, float, float], n_candidates: int = 256, tolerance: float = 0.01
) -> float:
    """The density level whose silhouettes best match where the field is at least 50% opaque.

    For each grid axis, the field is rendered orthographically: opacity = 1 - exp(-sum(density * step))
    along the axis; the target silhouette is opacity > 0.5. A level's silhouette along that axis is
    the set of rays whose maximum density exceeds it. The level maximising the mean IoU over the
    three axes wins. Levels within ``tolerance`` of the best IoU count as ties: a crisp field gives
    the same silhouette for every level between its outside and inside densities, and the middle of
    that range (in value) is taken, i.e. the middle of the density's rise at the surface.
    Raises ValueError when no ray reaches 50% opacity.
    """
    opaque, max_proj = [], []
    for axis in range(3):
        optical_depth = volume.sum(axis=axis, dtype=np.float64) * spacing[axis]
        opaque.append(optical_depth > math.log(2.0))
        max_proj.append(volume.max(axis=axis))
    if not any(mask.any() for mask in opaque):
        raise ValueError("no ray through the field reaches 50% opacity")
    values = np.concatenate([m.reshape(-1) for m in max_proj])
    values = values[values > 0]
    top = float(values.max())
    # Levels spread in rank (where the values are), linearly and logarithmically (where they are not).
    inner = slice(1, -1)
    candidates = np.unique(np.concatenate([
        np.quantile(values, np.linspace(0.0, 1.0, n_candidates + 2)[inner]),
        np.linspace(0.0, top, n_candidates + 2)[inner],
        np.geomspace(top * 1e-6, top, n_candidates + 2)[inner],
    ]))
    scores = np.zeros(len(candidates))
    for target, projection in zip(opaque, max_proj):
        inside = projection[None] > candidates[:, None, None]  # (C, R, R)
        intersection = (inside & target[None]).sum(axis=(1, 2))
        union = (inside | target[None]).sum(axis=(1, 2))
        scores += np.where(union > 0, intersection / np.maximum(union, 1), 1.0) / 3.0
    ties = candidates[scores >= scores.max() - tolerance]
    return float(0.5 * (ties.min() + ties.max()))


def _check_level(level: float, volume: np.ndarray, threshold_key: str) -> None:
    low, high = float(volume.min()), float(volume.max())
    if not low < level < high:
        raise UserError(
            f"isosurface level {level:.4g} is outside the field's range [{low:.4g}, {high:.4g}]; "
            f"set {threshold_key} to a number inside it (or 'auto')"
        )


def _resolve_level(
    volume: np.ndarray, spacing: Tuple[float, float, float], threshold: Threshold, threshold_key: str
) -> float:
    if isinstance(threshold, str):
        if threshold != "auto":
            raise UserError(f"{threshold_key} must be a number or 'auto', got '{threshold}'")
        try:
            return auto_isosurface_level(volume, spacing)
        except ValueError:
            raise UserError(
                f"no surface: the field (range [{float(volume.min()):.4g}, {float(volume.max()):.4g}]) is nowhere "
                f"50% opaque; set {threshold_key} to a number inside that range"
            ) from None
    level = float(threshold)
    _check_level(level, volume, threshold_key)
    return level


def remove_small_components(
    vertices: np.ndarray, faces: np.ndarray, min_fraction: float
) -> Tuple[np.ndarray, np.ndarray]:
    """Drop connected components with fewer than ``min_fraction`` of all faces, and unused vertices."""
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=False)
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(faces))
    counts = np.bincount(labels)
    keep = counts[labels] >= min_fraction * len(faces)
    mesh.update_faces(keep)
    mesh.remove_unreferenced_vertices()
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)


def clean_volume(volume: np.ndarray, level: float, fill_cavities: bool, smooth_sigma: float) -> np.ndarray:
    """Prepare a field for marching cubes.

    ``fill_cavities``: regions below ``level`` that are enclosed by the inside (no path to the grid's
    border) are raised above it. Fields fitted from images are unconstrained inside the object and
    leave bubbles there, whose surfaces are invisible yet dominate the face count.
    ``smooth_sigma`` (grid voxels, 0 = off): a Gaussian filter that removes the voxel-scale noise of
    a fitted field, which otherwise turns the surface into a sponge of tiny handles (thousands of UV
    charts and a volume that is part hollow).
    """
    from scipy import ndimage

    if fill_cavities:
        inside = volume > level
        cavities = ndimage.binary_fill_holes(inside) & ~inside
        if cavities.any():
            volume = np.where(cavities, max(level * 2.0, level + 1.0), volume).astype(volume.dtype)
    if smooth_sigma > 0:
        volume = ndimage.gaussian_filter(volume, smooth_sigma, mode="nearest")
    return volume


@dataclass
class IsosurfaceVolume:
    """The cleaned field on the fine grid of :func:`isosurface_volume`: ``values`` (R, R, R) in x, y, z
    order at the vertices of a grid spanning ``bbox_min``..``bbox_max``, meshed at ``level``."""

    values: np.ndarray
    level: float
    bbox_min: Tensor
    bbox_max: Tensor

    @property
    def spacing(self) -> Tuple[float, float, float]:
        return tuple(((self.bbox_max - self.bbox_min) / (self.values.shape[0] - 1)).tolist())


def isosurface_volume(
    field_fn: FieldFn,
    bbox_min: Tensor,
    bbox_max: Tensor,
    resolution: int,
    threshold: Threshold = "auto",
    coarse_resolution: int = 64,
    chunk_size: int = 65536,
    threshold_key: str = "isosurface_threshold",
    fill_cavities: bool = True,
    smooth_sigma: float = 0.0,
) -> IsosurfaceVolume:
    """The field, cleaned, on a grid tight around the region where it exceeds its level.

    Two passes: a coarse grid over the whole box finds the occupied region, padded by 10% of its size;
    the second pass at ``resolution`` covers only that region. ``threshold`` is a number or "auto"
    (:func:`auto_isosurface_level`, computed on each pass's grid). ``threshold_key`` names the config
    key in error messages. ``fill_cavities`` and ``smooth_sigma`` (in fine-grid voxels) clean the fine
    grid (:func:`clean_volume`).
    """
    bbox_min, bbox_max = bbox_min.float(), bbox_max.float()
    coarse_resolution = min(coarse_resolution, resolution)
    coarse = evaluate_on_grid(field_fn, bbox_min, bbox_max, coarse_resolution, chunk_size, "isosurface coarse pass")
    coarse_spacing = tuple(((bbox_max - bbox_min) / (coarse_resolution - 1)).tolist())
    level = _resolve_level(coarse, coarse_spacing, threshold, threshold_key)

    occupied = np.argwhere(coarse > level)
    if len(occupied) == 0:  # the level lies between the coarse samples: keep the whole box
        occupied = np.array([[1, 1, 1], [coarse_resolution - 2] * 3])
    voxel = (bbox_max - bbox_min) / (coarse_resolution - 1)
    # The occupied voxels' bounds widened by one voxel (the surface crosses into the next one), then 10%.
    tight_min = bbox_min + torch.from_numpy(occupied.min(axis=0) - 1).float().to(bbox_min) * voxel
    tight_max = bbox_min + torch.from_numpy(occupied.max(axis=0) + 1).float().to(bbox_min) * voxel
    pad = 0.1 * (tight_max - tight_min)
    tight_min = torch.maximum(tight_min - pad, bbox_min)
    tight_max = torch.minimum(tight_max + pad, bbox_max)

    fine = evaluate_on_grid(field_fn, tight_min, tight_max, resolution, chunk_size, "isosurface fine pass")
    spacing = tuple(((tight_max - tight_min) / (resolution - 1)).tolist())
    if threshold == "auto":
        level = _resolve_level(fine, spacing, threshold, threshold_key)
    else:
        _check_level(level, fine, threshold_key)
    fine = clean_volume(fine, level, fill_cavities, smooth_sigma)
    return IsosurfaceVolume(values=fine, level=level, bbox_min=tight_min, bbox_max=tight_max)


def extract_isosurface(
    field_fn: FieldFn,
    bbox_min: Tensor,
    bbox_max: Tensor,
    resolution: int,
    threshold: Threshold = "auto",
    remove_outliers: bool = True,
    outlier_fraction: float = 0.01,
    coarse_resolution: int = 64,
    chunk_size: int = 65536,
    threshold_key: str = "isosurface_threshold",
    fill_cavities: bool = True,
    smooth_sigma: float = 0.0,
) -> IsosurfaceMesh:
    """Mesh the region where ``field_fn`` (points (N, 3) -> (N, 1)) exceeds a level: marching cubes
    of :func:`isosurface_volume` (same arguments), then connected components with fewer than
    ``outlier_fraction`` of the faces removed when ``remove_outliers``."""
    volume = isosurface_volume(
        field_fn, bbox_min, bbox_max, resolution, threshold, coarse_resolution, chunk_size, threshold_key,
        fill_cavities, smooth_sigma,
    )
    # The field is larger inside: "ascent" winds the faces so that their normals point out.
    vertices, faces, _, _ = measure.marching_cubes(
        volume.values, level=volume.level, spacing=volume.spacing, gradient_direction="ascent")
    if remove_outliers and len(faces) > 0:
        vertices, faces = remove_small_components(vertices, faces, outlier_fraction)
    vertices = torch.from_numpy(np.ascontiguousarray(vertices)).float().to(volume.bbox_min) + volume.bbox_min
    faces = torch.from_numpy(np.ascontiguousarray(faces)).long().to(volume.bbox_min.device)
    return IsosurfaceMesh(vertices=vertices, faces=faces, level=volume.level)
