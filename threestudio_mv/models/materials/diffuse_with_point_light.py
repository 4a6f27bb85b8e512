"""``diffuse-with-point-light``: Lambertian albedo lit by a point light plus ambient light."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import threestudio_mv
from threestudio_mv.models.materials.base import BaseMaterial, color_activation
from threestudio_mv.utils.errors import UserError

SHADINGS = ("albedo", "diffuse", "textureless")


@threestudio_mv.register("diffuse-with-point-light")
class DiffuseWithPointLightMaterial(BaseMaterial):
    """albedo * (ambient + diffuse * max(0, n . l)), with DreamFusion's random shading modes.

    One shading mode per forward call (one per batch): in training "albedo" during the first
    ``ambient_only_steps`` steps, afterwards "albedo" with probability 1 - diffuse_prob, else
    "textureless" (white albedo) with probability textureless_prob, else "diffuse". In eval "diffuse"
    (or "albedo" while ambient-only). ``shading=`` in the call overrides the choice, and
    ``ambient_ratio=`` sets ambient = ratio and diffuse = 1 - ratio (grey lights). With
    ``soft_shading``, training draws that ratio uniformly in [0, 1] per call instead of the
    configured light colours. Outputs are clamped to [0, 1].
    """

    requires_normal = True

    @dataclass
    class Config:
        ambient_light_color: List[float] = field(default_factory=lambda: [0.1, 0.1, 0.1])
        diffuse_light_color: List[float] = field(default_factory=lambda: [0.9, 0.9, 0.9])
        ambient_only_steps: int = 1000
        diffuse_prob: float = 0.75
        textureless_prob: float = 0.5
        albedo_activation: str = "sigmoid"
        soft_shading: bool = False

    cfg: Config

    def configure(self, **kwargs: Any) -> None:
        prefix = self.config_prefix
        for key in ("ambient_light_color", "diffuse_light_color"):
            if len(getattr(self.cfg, key)) != 3:
                raise UserError(f"config key '{prefix}.{key}' needs 3 numbers (RGB), got {getattr(self.cfg, key)}")
        self.albedo_activation = color_activation(self.cfg.albedo_activation, f"{prefix}.albedo_activation")
        self.register_buffer("ambient_light_color", torch.tensor(self.cfg.ambient_light_color), persistent=False)
        self.register_buffer("diffuse_light_color", torch.tensor(self.cfg.diffuse_light_color), persistent=False)
        self.ambient_only = self.cfg.ambient_only_steps > 0

    def on_update_step(self, epoch: int, global_step: int) -> None:
        self.ambient_only = global_step < self.cfg.ambient_only_steps

    def choose_shading(self) -> str:
        """The shading mode of this call when none is given (see the class docstring)."""
        if not self.training:
            return "albedo" if self.ambient_only else "diffuse"
        if self.ambient_only or torch.rand(()).item() > self.cfg.diffuse_prob:
            return "albedo"
        return "textureless" if torch.rand(()).item() < self.cfg.textureless_prob else "diffuse"

    def shades_with_normals(self, shading: Optional[str] = None, **kwargs: Any) -> bool:
        """False when the call will return the albedo for sure (asked to, or in the ambient-only steps)."""
        if shading is not None:
            return shading != "albedo"
        return not self.ambient_only

    def forward(
        self,
        features: Tensor,
        viewdirs: Tensor,
        positions: Tensor,
        light_positions: Tensor,
        shading_normal: Optional[Tensor] = None,
        shading: Optional[str] = None,
        ambient_ratio: Optional[float] = None,
        **kwargs: Any,
    ) -> Tensor:
        shading = shading or self.choose_shading()
        if shading not in SHADINGS:
            raise UserError(f"unknown shading '{shading}'; use one of {', '.join(SHADINGS)}")
        albedo = self.albedo_activation(features[..., :3])
        if shading == "albedo":
            return albedo
        if shading_normal is None:
            raise UserError(
                "diffuse-with-point-light needs shading normals: set system.geometry.normal_type to "
                "'analytic' or 'finite_difference'"
            )
        ambient, diffuse = self.ambient_light_color, self.diffuse_light_color
        if ambient_ratio is not None:
            ambient, diffuse = torch.full_like(ambient, ambient_ratio), torch.full_like(diffuse, 1.0 - ambient_ratio)
        elif self.training and self.cfg.soft_shading:
            ratio = torch.rand((), device=features.device)
            ambient, diffuse = ratio.expand(3), (1.0 - ratio).expand(3)
        light_directions = F.normalize(light_positions - positions, dim=-1)
        lambert = (shading_normal * light_directions).sum(-1, keepdim=True).clamp(min=0.0)
        light = (ambient + lambert * diffuse).clamp(0.0, 1.0)
        if shading == "textureless":
            return light
        return (albedo * light).clamp(0.0, 1.0)

    def export(self, features: Tensor, **kwargs: Any) -> Dict[str, Tensor]:
        return {"albedo": self.albedo_activation(features[..., :3])}
