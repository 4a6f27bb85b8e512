"""Analytic encodings without parameters: sinusoidal frequencies and real spherical harmonics."""
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from threestudio_mv.models.encodings.base import Encoding
from threestudio_mv.utils.errors import UserError


class Frequency(Encoding):
    """sin(2^k pi x) and cos(2^k pi x) for k < n_frequencies, per input dim; optionally the raw input first.

    n_output_dims = n_input_dims * (2 * n_frequencies + include_input).
    """

    @dataclass
    class Config:
        otype: str = "Frequency"
        n_frequencies: int = 6
        include_input: bool = False

    cfg: Config

    def configure(self, n_input_dims: int = 3, **kwargs: Any) -> None:
        super().configure(n_input_dims)
        if self.cfg.n_frequencies < 1:
            raise UserError(
                f"config key '{self.config_prefix}.n_frequencies' must be >= 1, got {self.cfg.n_frequencies}"
            )
        bands = math.pi * 2.0 ** torch.arange(self.cfg.n_frequencies, dtype=torch.float32)
        self.register_buffer("bands", bands, persistent=False)
        self.n_output_dims = n_input_dims * (2 * self.cfg.n_frequencies + int(self.cfg.include_input))

    def forward(self, x: Tensor) -> Tensor:
        """(N, D) -> (N, n_output_dims)."""
        angles = (x.float()[:, :, None] * self.bands).reshape(x.shape[0], self.n_input_dims * self.cfg.n_frequencies)
        parts = [torch.sin(angles), torch.cos(angles)]
        if self.cfg.include_input:
            parts.insert(0, x.float())
        return torch.cat(parts, dim=-1)


class SphericalHarmonics(Encoding):
    """Real spherical harmonics of a direction, bands 0 .. degree-1 (degree^2 outputs, degree 1 to 4).

    Inputs are directions mapped to [0, 1]^3 as (d + 1) / 2, tinycudann's convention.
    """

    @dataclass
    class Config:
        otype: str = "SphericalHarmonics"
        degree: int = 3

    cfg: Config

    def configure(self, n_input_dims: int = 3, **kwargs: Any) -> None:
        super().configure(n_input_dims)
        if n_input_dims != 3:
            raise UserError(f"{self.config_prefix}: SphericalHarmonics encodes 3D directions, got {n_input_dims} dims")
        if not 1 <= self.cfg.degree <= 4:
            raise UserError(f"config key '{self.config_prefix}.degree' must be 1 to 4, got {self.cfg.degree}")
        self.n_output_dims = self.cfg.degree**2

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3) in [0, 1] -> (N, degree^2)."""
        d = x.float() * 2.0 - 1.0
        x_, y, z = d.unbind(-1)
        out = [torch.full_like(x_, 0.28209479177387814)]
        if self.cfg.degree > 1:
            out += [-0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x_]
        if self.cfg.degree > 2:
            xx, yy, zz = x_ * x_, y * y, z * z
            out += [
                1.0925484305920792 * x_ * y,
                -1.0925484305920792 * y * z,
                0.94617469575755997 * zz - 0.31539156525251999,
                -1.0925484305920792 * x_ * z,
                0.54627421529603959 * (xx - yy),
            ]
        if self.cfg.degree > 3:
            out += [
                0.59004358992664352 * y * (3.0 * xx - yy),
                2.8906114426405538 * x_ * y * z,
                0.45704579946446572 * y * (1.0 - 5.0 * zz),
                0.3731763325901154 * z * (5.0 * zz - 3.0),
                0.45704579946446572 * x_ * (1.0 - 5.0 * zz),
                1.4453057213202769 * z * (xx - yy),
                0.59004358992664352 * x_ * (3.0 * yy - xx),
            ]
        return torch.stack(out, dim=-1)
