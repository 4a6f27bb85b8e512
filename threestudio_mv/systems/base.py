"""BaseSystem: what every system (text-to-3D, reconstruction, model training) shares.

A system says what one step is; Lightning's trainer owns devices, precision, checkpointing, logging
and distribution. The system owns its trial folder's ``save/`` outputs (images, videos, exports).
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch

from threestudio_mv.utils.base import Updateable
from threestudio_mv.utils.config import parse_structured
from threestudio_mv.utils.errors import UserError
from threestudio_mv.utils.io import ImageLike, image_grid, save_image, save_json, save_video


@dataclass
class OptimizerConfig:
    """``name`` is a torch.optim class; ``params`` maps a submodule or parameter path (e.g.
    ``geometry.encoding``, ``geometry.sdf``) to per-group settings such as ``lr``; parameters not
    listed use ``args``."""

    name: str = "AdamW"
    args: Dict[str, Any] = field(default_factory=lambda: {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-15})
    params: Dict[str, Any] = field(default_factory=dict)


class BaseSystem(pl.LightningModule, Updateable):
    """Config-driven LightningModule with a trial folder and saving helpers."""

    @dataclass
    class Config:
        optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    cfg: Any

    def __init__(self, cfg: Optional[Any] = None, trial_dir: Optional[str] = None) -> None:
        super().__init__()
        self.cfg = cfg if isinstance(cfg, self.Config) else parse_structured(self.Config, cfg, "system")
        self.trial_dir = Path(trial_dir) if trial_dir else Path.cwd() / "outputs" / "scratch"
        self.test_outputs: Dict[str, Path] = {}  # what --test wrote (name -> file), printed by launch
        self.configure()

    # ----------------------------------------------------------------------------- construction
    def configure(self) -> None:
        """Build modules from ``self.cfg``."""

    @property
    def save_dir(self) -> Path:
        return self.trial_dir / "save"

    @property
    def true_global_step(self) -> int:
        """The optimiser step: the trainer's while training, the checkpoint's after load_trained."""
        if self._trainer is not None:  # --test/--validate of a loaded trial: the trainer's step stays 0
            return max(int(self.global_step), self._restored_step)
        return self._restored_step

    _restored_step: int = 0

    def load_trained(self, ckpt_path: str, replaceable: Tuple[str, ...] = ()) -> None:
        """Load a trial checkpoint's weights for --export/--test without training; modules under the
        ``replaceable`` prefixes (e.g. ``background.``) keep their own weights where the checkpoint's
        do not fit them (a module swapped for another)."""
        if not Path(ckpt_path).is_file():
            raise UserError(f"checkpoint '{ckpt_path}' not found")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        self.on_load_checkpoint(checkpoint)
        own = self.state_dict()
        state = checkpoint["state_dict"]
        swapped = {k for k in set(own) | set(state) if k.startswith(replaceable) and (k not in own or k not in state or own[k].shape != state[k].shape)}
        prefixes = tuple({k.split(".")[0] + "." for k in swapped})
        if prefixes:  # a swapped module: none of its saved weights apply
            state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
            state.update({k: v for k, v in own.items() if k.startswith(prefixes)})
        self.load_state_dict(state)
        self._restored_step = int(checkpoint.get("global_step", 0))

    # ----------------------------------------------------------------------------- step updates
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.update_step(self.current_epoch, self.true_global_step)
        datamodule = getattr(self.trainer, "datamodule", None)
        if isinstance(datamodule, Updateable):
            datamodule.update_step(self.current_epoch, self.true_global_step)

    # ----------------------------------------------------------------------------- optimiser
    def parameter_groups(self) -> List[Dict[str, Any]]:
        """Parameter groups from ``cfg.optimizer.params``; the rest go in a default group."""
        groups, claimed = [], set()
        for path, settings in self.cfg.optimizer.params.items():
            module = self
            for part in path.split("."):
                if not hasattr(module, part):
                    raise UserError(f"config key 'system.optimizer.params.{path}': the system has no module '{path}'")
                module = getattr(module, part)
            if isinstance(module, torch.Tensor):  # a parameter, or a buffer (e.g. a fixed geometry's): no group
                candidates = [module] if isinstance(module, torch.nn.Parameter) else []
            else:
                candidates = module.parameters()
            params = [p for p in candidates if p.requires_grad and id(p) not in claimed]
            claimed.update(id(p) for p in params)
            if params:
                groups.append({"params": params, "name": path, **dict(settings or {})})
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in claimed]
        if rest:
            groups.append({"params": rest, "name": "default"})
        return groups

    def configure_optimizers(self) -> Any:
        name = self.cfg.optimizer.name
        if not hasattr(torch.optim, name):
            raise UserError(f"config key 'system.optimizer.name': unknown optimizer '{name}' (use a torch.optim class, e.g. AdamW)")
        args = dict(self.cfg.optimizer.args)
        if "betas" in args:
            args["betas"] = tuple(args["betas"])
        return getattr(torch.optim, name)(self.parameter_groups(), **args)

    # ----------------------------------------------------------------------------- saving
    @property
    def is_global_zero(self) -> bool:
        trainer = self._trainer
        return trainer is None or trainer.is_global_zero

    def save_image(self, name: str, image: ImageLike) -> Optional[Path]:
        if not self.is_global_zero:
            return None
        return save_image(self.save_dir / name, image)

    def save_image_grid(self, name: str, rows: Sequence[Sequence[ImageLike]]) -> Optional[Path]:
        """Save rows of same-sized images as one PNG grid."""
        if not self.is_global_zero:
            return None
        return save_image(self.save_dir / name, image_grid(rows))

    def save_video(self, name: str, frames: Iterable[ImageLike], fps: int = 30) -> Optional[Path]:
        if not self.is_global_zero:
            return None
        return save_video(self.save_dir / name, list(frames), fps=fps)

    def save_metrics(self, metrics: Dict[str, Any]) -> Optional[Path]:
        """Merge ``metrics`` into the trial's metrics.json."""
        if not self.is_global_zero:
            return None
        import json

        path = self.trial_dir / "metrics.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update(metrics)
        return save_json(path, current)

    def export(self) -> Dict[str, Path]:
        """Export the result (e.g. a textured mesh) into ``save/it<step>-export``."""
        raise UserError(f"system '{type(self).__name__}' has nothing to export; drop --export")
