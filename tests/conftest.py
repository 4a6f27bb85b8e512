import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture()
def quick_trainer():
    """A factory of bare CPU Lightning trainers: ``quick_trainer(steps)`` validates once at the end."""
    import pytorch_lightning as pl

    def make(steps: int) -> "pl.Trainer":
        return pl.Trainer(
            max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, val_check_interval=steps,
            check_val_every_n_epoch=None, num_sanity_val_steps=0, limit_val_batches=1,
        )

    return make
