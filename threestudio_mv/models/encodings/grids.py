"""Explicit feature grids sampled with ``torch.nn.functional.grid_sample``: triplane and dense 3D grid.

Both map inputs in [0, 1] to the grid's extent with ``align_corners=True`` (the first and last texels
sit on the box faces) and clamp outside it (``padding_mode="border"``).
"""
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threestudio_mv.models.encodings.base import Encoding
from threestudio_mv.utils.errors import UserError


class Triplane(Encoding):
    """Three axis-aligned feature planes (xy, xz, yz), each (n_features, resolution, resolution).

    ``reduction="concat"`` (default) concatenates the three bilinear lookups (n_output_dims =
    3 * n_features), which keeps which plane a feature came from; ``"sum"`` adds them (EG3D style,
    n_output_dims = n_features). Planes start as N(0, init_std^2).
    """

    @dataclass
    class Config:
        otype: str = "Triplane"
        resolution: int = 128
        n_features: int = 16
        reduction: str = "concat"
        init_std: float = 0.1

    cfg: Config

    def configure(self, n_input_dims: int = 3, **kwargs: Any) -> None:
        super().configure(n_input_dims)
        if n_input_dims != 3:
            raise UserError(f"{self.config_prefix}: Triplane encodes 3D points, got n_input_dims={n_input_dims}")
        if self.cfg.reduction not in ("concat", "sum"):
            raise UserError(
                f"config key '{self.config_prefix}.reduction' must be 'concat' or 'sum', got '{self.cfg.reduction}'"
            )
        res, n_feats = self.cfg.resolution, self.cfg.n_features
        self.planes = nn.Parameter(torch.randn(3, n_feats, res, res) * self.cfg.init_std)
        self.n_output_dims = n_feats * (3 if self.cfg.reduction == "concat" else 1)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3) in [0, 1] -> (N, n_output_dims)."""
        coords = x.float() * 2.0 - 1.0
        # grid_sample's grid[..., 0] indexes the plane's width, grid[..., 1] its height.
        plane_coords = torch.stack([coords[:, [0, 1]], coords[:, [0, 2]], coords[:, [1, 2]]])  # (3, N, 2)
        sampled = F.grid_sample(
            self.planes, plane_coords[:, None], mode="bilinear", padding_mode="border", align_corners=True
        )  # (3, F, 1, N)
        sampled = sampled[:, :, 0].permute(2, 0, 1)  # (N, 3, F)
        if self.cfg.reduction == "sum":
            return sampled.sum(dim=1)
        return sampled.reshape(x.shape[0], self.n_output_dims)


class DenseGrid(Encoding):
    """A dense (n_features, resolution^3) grid with trilinear interpolation; init uniform +-1e-4."""

    @dataclass
    class Config:
        otype: str = "DenseGrid"
        resolution: int = 64
        n_features: int = 16

    cfg: Config

    def configure(self, n_input_dims: int = 3, **kwargs: Any) -> None:
        super().configure(n_input_dims)
        if n_input_dims != 3:
            raise UserError(f"{self.config_prefix}: DenseGrid encodes 3D points, got n_input_dims={n_input_dims}")
        res = self.cfg.resolution
        # Indexed [feature, z, y, x]: grid_sample reads grid[..., 0] as x (width) and grid[..., 2] as z (depth).
        self.grid = nn.Parameter(torch.empty(1, self.cfg.n_features, res, res, res).uniform_(-1e-4, 1e-4))
        self.n_output_dims = self.cfg.n_features

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3) in [0, 1] -> (N, n_features)."""
        coords = x.float() * 2.0 - 1.0
        sampled = F.grid_sample(
            self.grid, coords[None, :, None, None, :], mode="bilinear", padding_mode="border", align_corners=True
        )  # (1, F, N, 1, 1)
        return sampled.reshape(self.cfg.n_features, x.shape[0]).T
