"""``no-material``: the colour is an activation of the features (no lighting)."""
from dataclasses import dataclass
from typing import Any, Dict, Optional

from torch import Tensor

import threestudio_mv
from threestudio_mv.models.materials.base import BaseMaterial, color_activation


@threestudio_mv.register("no-material")
class NoMaterial(BaseMaterial):
    """rgb = color_activation(features[:, :n_output_dims])."""

    @dataclass
    class Config:
        n_output_dims: int = 3
        color_activation: str = "sigmoid"

    cfg: Config

    def configure(self, **kwargs: Any) -> None:
        self.activation = color_activation(self.cfg.color_activation, f"{self.config_prefix}.color_activation")

    def forward(
        self,
        features: Tensor,
        viewdirs: Optional[Tensor] = None,
        positions: Optional[Tensor] = None,
        light_positions: Optional[Tensor] = None,
        shading_normal: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Tensor:
        return self.activation(features[..., : self.cfg.n_output_dims])

    def export(self, features: Tensor, **kwargs: Any) -> Dict[str, Tensor]:
        return {"albedo": self.activation(features[..., :3])}
