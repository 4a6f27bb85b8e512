"""Plug-in ``sky-gradient``: a background that blends a ground colour below the horizon into a sky
colour overhead, by the world ray direction's z (z up). Turntables then show where up is.

An example of an extension (extensions/README.md): a package that registers its own module, found
by ``launch`` at start-up, used from a config as ``system.background_type: sky-gradient``.
"""
from dataclasses import dataclass, field
from typing import Any, List

import torch
from torch import Tensor

import threestudio_mv
from threestudio_mv.models.background.base import BaseBackground
from threestudio_mv.utils.errors import UserError


@threestudio_mv.register("sky-gradient")
class SkyGradientBackground(BaseBackground):
    """``ground`` colour for rays pointing down, ``sky`` for rays pointing up, a linear blend in
    between over the band of elevations [-``band``, ``band``] (sine of the elevation)."""

    @dataclass
    class Config:
        ground: List[float] = field(default_factory=lambda: [0.85, 0.85, 0.85])
        sky: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
        band: float = 0.5

    cfg: Config

    def configure(self, **kwargs: Any) -> None:
        for key in ("ground", "sky"):
            if len(getattr(self.cfg, key)) != 3:
                raise UserError(f"config key '{self.config_prefix}.{key}' needs 3 numbers (RGB), got {getattr(self.cfg, key)}")
        if self.cfg.band <= 0:
            raise UserError(f"config key '{self.config_prefix}.band' must be > 0, got {self.cfg.band}")
        self.register_buffer("ground", torch.tensor(self.cfg.ground, dtype=torch.float32))
        self.register_buffer("sky", torch.tensor(self.cfg.sky, dtype=torch.float32))

    def forward(self, dirs: Tensor) -> Tensor:
        up = torch.nn.functional.normalize(dirs, dim=-1)[..., 2:3]
        weight = ((up / self.cfg.band).clamp(-1.0, 1.0) + 1.0) / 2.0
        return torch.lerp(self.ground.to(dirs.dtype), self.sky.to(dirs.dtype), weight)
