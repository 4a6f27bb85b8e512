"""Base classes: Updateable (step hooks) and BaseModule (config-driven nn.Module)."""
from dataclasses import dataclass
from typing import Any, Optional

import torch.nn as nn

from threestudio_mv.utils.config import parse_structured


class Updateable:
    """Objects whose settings change with the global step (C() schedules).

    ``update_step`` calls ``update_step`` on every child Updateable registered as an nn.Module child
    or listed in ``_updateable_children``; subclasses override :meth:`on_update_step`.
    """

    def update_step(self, epoch: int, global_step: int) -> None:
        self.on_update_step(epoch, global_step)
        children = list(getattr(self, "_updateable_children", []))
        if isinstance(self, nn.Module):
            children += [m for m in self.children() if isinstance(m, Updateable)]
        seen = set()
        for child in children:
            if id(child) not in seen:
                seen.add(id(child))
                child.update_step(epoch, global_step)

    def on_update_step(self, epoch: int, global_step: int) -> None:
        pass


class BaseModule(nn.Module, Updateable):
    """A registered module configured by its nested ``Config`` dataclass.

    ``cfg`` may be a dict, a DictConfig or a Config instance; ``prefix`` is its key in the trial
    config, used in error messages.
    """

    @dataclass
    class Config:
        pass

    cfg: Any

    def __init__(self, cfg: Optional[Any] = None, prefix: str = "", **kwargs: Any) -> None:
        super().__init__()
        if isinstance(cfg, self.Config):
            self.cfg = cfg
        else:
            self.cfg = parse_structured(self.Config, cfg, prefix)
        self.configure(**kwargs)

    def configure(self, **kwargs: Any) -> None:
        """Build submodules from ``self.cfg``."""
