"""Regularisers shared by the systems (each lives here once)."""
from typing import Dict

import torch


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
