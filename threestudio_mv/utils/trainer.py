"""Lightning pieces the launcher needs: a whole-run progress bar with ETA, atomic checkpoints."""
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
