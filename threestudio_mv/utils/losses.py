"""Regularisers shared by the systems (each lives here once)."""
from typing import Any, Callable, Dict

import torch
import torch.nn.functional as F


def binary_entropy(opacity: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy of opacities: pushes them toward 0 or 1 (no semi-transparent haze)."""
    p = opacity.clamp(1e-4, 1 - 1e-4)
    return (-(p * torch.log(p) + (1 - p) * torch.log(1 - p))).mean()


def sparsity(opacity: torch.Tensor) -> torch.Tensor:
    """Smooth L1 of opacity: fewer occupied pixels (threestudio's sparsity loss)."""
    return torch.sqrt(opacity.square() + 0.01).mean()


def orientation(out: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Penalise normals facing away from the camera, weighted by sample weights (Ref-NeRF)."""
    weights, normal, t_dirs = out["weights"].reshape(-1), out["normal"].reshape(-1, 3), out["t_dirs"].reshape(-1, 3)
    facing_away = torch.relu((normal * t_dirs).sum(-1)).square()
    return (weights * facing_away).sum() / (out["opacity"] > 0).sum().clamp_min(1)


def z_variance(out: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Depth variance along opaque rays: thin, surface-like density."""
    return (out["z_variance"] * (out["opacity"] > 0.5)).mean()


def normal_consistency(mesh: Any) -> torch.Tensor:
    """Mean (1 - cos) between the normals of faces sharing an edge (smooth, creaseless surfaces)."""
    from threestudio_mv.utils.rasterize import face_neighbours

    corners = mesh.vertices[mesh.faces]
    normals = F.normalize(torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1), dim=-1)
    neighbours = face_neighbours(mesh.faces)
    face, edge = torch.nonzero(neighbours >= 0, as_tuple=True)
    return (1.0 - (normals[face] * normals[neighbours[face, edge]]).sum(-1)).mean()


def laplacian_smoothness(mesh: Any) -> torch.Tensor:
    """Mean squared uniform-Laplacian of the vertices: each vertex minus the mean of its neighbours."""
    vertices, faces = mesh.vertices, mesh.faces
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges = torch.cat([edges, edges.flip(1)])
    total = torch.zeros_like(vertices).index_add(0, edges[:, 0], vertices[edges[:, 1]])
    count = torch.zeros_like(vertices[:, :1]).index_add(0, edges[:, 0], torch.ones_like(vertices[edges[:, 1], :1]))
    return (vertices - total / count.clamp_min(1)).square().sum(-1).mean()


def albedo_smoothness(albedo: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor, scale: float, count: int) -> torch.Tensor:
    """Mean L1 difference of ``albedo`` (a function of (N, 3) points) between ``count`` random ``points``
    and the same points jittered by N(0, scale^2): a smooth texture, as textured-mesh stages use."""
    if points.shape[0] > count:
        points = points[torch.randint(points.shape[0], (count,), device=points.device)]
    jittered = points + scale * torch.randn_like(points)
    return (albedo(points) - albedo(jittered)).abs().mean()
