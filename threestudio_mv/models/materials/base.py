"""Base class of materials: raw geometry features + shading inputs -> colour in [0, 1]."""
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

from threestudio_mv.utils.base import BaseModule
from threestudio_mv.utils.errors import UserError

_COLOR_ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "scale_-11_01": lambda x: (x * 0.5 + 0.5).clamp(0.0, 1.0),
    "none": lambda x: x.clamp(0.0, 1.0),
}


def color_activation(name: str, key: str) -> Callable[[Tensor], Tensor]:
    """Feature -> colour in [0, 1]: "sigmoid", "scale_-11_01" ((x + 1) / 2, clamped) or "none" (clamped)."""
    if name not in _COLOR_ACTIVATIONS:
        raise UserError(f"config key '{key}': unknown activation '{name}'; use one of {', '.join(_COLOR_ACTIVATIONS)}")
    return _COLOR_ACTIVATIONS[name]


class BaseMaterial(BaseModule):
    """``forward(features, viewdirs, positions, light_positions, shading_normal=None, **kwargs) -> rgb``.

    ``requires_normal`` tells the renderer whether shading normals must be computed.
    """

    requires_normal: bool = False

    def __init__(self, cfg: Optional[Any] = None, prefix: str = "system.material", **kwargs: Any) -> None:
        self.config_prefix = prefix  # plain attribute, allowed before nn.Module.__init__
        super().__init__(cfg, prefix, **kwargs)

    def forward(
        self,
        features: Tensor,
        viewdirs: Tensor,
        positions: Tensor,
        light_positions: Tensor,
        shading_normal: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Tensor:
        raise NotImplementedError

    def shades_with_normals(self, shading: Optional[str] = None, **kwargs: Any) -> bool:
        """Whether the next call (with these keyword arguments) may read ``shading_normal``."""
        return self.requires_normal

    def export(self, features: Tensor, **kwargs: Any) -> Dict[str, Tensor]:
        """Texture channels from raw features: at least {"albedo": (N, 3) in [0, 1]}."""
        raise NotImplementedError
