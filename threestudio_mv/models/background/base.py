"""Base class of backgrounds: ray directions (B, H, W, 3) -> colour (B, H, W, 3) in [0, 1]."""
from typing import Any, Optional

from torch import Tensor

from threestudio_mv.utils.base import BaseModule


class BaseBackground(BaseModule):
    """``forward(dirs)`` with dirs (B, H, W, 3) world ray directions (any length) -> (B, H, W, 3)."""

    def __init__(self, cfg: Optional[Any] = None, prefix: str = "system.background", **kwargs: Any) -> None:
        self.config_prefix = prefix  # plain attribute, allowed before nn.Module.__init__
        super().__init__(cfg, prefix, **kwargs)

    def forward(self, dirs: Tensor) -> Tensor:
        raise NotImplementedError
