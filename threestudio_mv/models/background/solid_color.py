"""``solid-color``: one colour everywhere, fixed or learned."""
from dataclasses import dataclass, field
from typing import Any, List

import torch
from torch import Tensor, nn

import threestudio_mv
from threestudio_mv.models.background.base import BaseBackground
from threestudio_mv.utils.errors import UserError


@threestudio_mv.register("solid-color")
class SolidColorBackground(BaseBackground):
    """``color`` (RGB in [0, 1]) everywhere; a parameter when ``learned`` (clamped to [0, 1] on output)."""

    @dataclass
    class Config:
        color: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
        learned: bool = False

    cfg: Config

    def configure(self, **kwargs: Any) -> None:
        if len(self.cfg.color) != 3:
            raise UserError(f"config key '{self.config_prefix}.color' needs 3 numbers (RGB), got {self.cfg.color}")
        color = torch.tensor(self.cfg.color, dtype=torch.float32)
        if self.cfg.learned:
            self.color = nn.Parameter(color)
        else:
            self.register_buffer("color", color)

    def forward(self, dirs: Tensor) -> Tensor:
        return self.color.clamp(0.0, 1.0).to(dirs.dtype).expand(*dirs.shape[:-1], 3)
