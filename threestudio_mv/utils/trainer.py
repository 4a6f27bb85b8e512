"""Lightning pieces the launcher needs: a whole-run progress bar with ETA, atomic checkpoints."""
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import TQDMProgressBar

from threestudio_mv.utils.io import atomic_path


class StepProgressBar(TQDMProgressBar):
    """Training progress over the whole run (total = ``trainer.max_steps``), so tqdm shows an ETA.

    Lightning's default bar counts batches per epoch, which is unknown ("10000/?") for the infinite
    camera samplers every text-to-3D system uses.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._whole_run(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self._whole_run(trainer)

    def _whole_run(self, trainer: pl.Trainer) -> None:
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:
            # A resumed run starts at global_step: count it as the initial position rather than as
            # progress made now, so the rate and the ETA reflect this run's speed.
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = bar.last_print_n = trainer.global_step
            bar.refresh()
        bar.set_description(f"Train (epoch {trainer.current_epoch})")

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Dict[str, Any]:
        """The logged values shown on the bar, without Lightning's logger version (``v_num``)."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if step - bar.n >= self.refresh_rate or step >= trainer.max_steps:
            bar.update(step - bar.n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file and renamed: an interrupted save loses nothing."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        with atomic_path(Path(path)) as tmp:
            torch.save(checkpoint, tmp)

    def remove_checkpoint(self, path: Any) -> None:
        if os.path.exists(path):
            os.remove(path)


def warmup_cosine_factor(step: int, warmup_steps: int, decay_start_step: Optional[int], end_step: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at ``step`` (for ``torch.optim.lr_scheduler.LambdaLR``): linear
    warm-up over ``warmup_steps``, then constant, or from ``decay_start_step`` a cosine down to
    ``min_lr_ratio`` at ``end_step`` (held after it). The one lr schedule of the trainers.

    Written here rather than taken from diffusers' ``get_cosine_schedule_with_warmup``, which decays
    to 0 from the end of warm-up: the recipes here hold the lr before decaying (a resumed run extends
    its training) and keep a floor.
    """
    factor = min(1.0, (step + 1) / max(1, warmup_steps))
    if decay_start_step is not None and end_step > decay_start_step and step > decay_start_step:
        progress = min(1.0, (step - decay_start_step) / (end_step - decay_start_step))
        factor *= min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor
