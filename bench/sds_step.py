"""Seconds per text-to-3D training step by render resolution, x0-SDS against plain SDS, printed as JSON.

Builds the system and data module of ``configs/mvdream.yaml`` (the default) exactly as launch.py does,
for each render size and each loss (x0-SDS: ``recon_loss: true``; the baseline, plain SDS:
``recon_loss: false``), fits ``--steps`` steps with Lightning and times every step (render, guidance,
backward, optimiser). The first ``--warmup`` steps are left out (occupancy-grid warm-up, allocator).
On CUDA (``--gpu``) the same runs use the GPU.

    python bench/sds_step.py [--sizes 32 64] [--steps 40] [--warmup 25] [--gpu]
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repository, when not pip-installed

import threestudio_mv  # noqa: E402
from threestudio_mv.launch import TrialConfig, load_yaml_with_extends, quiet_libraries  # noqa: E402
from threestudio_mv.utils.config import parse_structured  # noqa: E402
from threestudio_mv.utils.errors import exit_on_user_error  # noqa: E402

CONFIG = REPO / "configs" / "mvdream.yaml"
PROMPT = "a red cube on top of a blue cylinder"


class StepTimer(pl.Callback):
    """Wall time of every training step (batch start to batch end)."""

    def __init__(self) -> None:
        self.seconds: List[float] = []
        self._start = 0.0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        self._sync(pl_module)
        self.seconds.append(time.perf_counter() - self._start)


def time_steps(overrides: List[str], steps: int, warmup: int, gpu: bool, config: Path = CONFIG) -> Dict[str, float]:
    """Fit ``steps`` steps of ``config`` (default: the default config) with ``overrides`` (dotlist) in the
    config's ``trainer.precision``; time all but ``warmup``. On CUDA also the peak memory allocated."""
    raw = OmegaConf.merge(load_yaml_with_extends(config), OmegaConf.from_dotlist(overrides))
    cfg = parse_structured(TrialConfig, raw)
    pl.seed_everything(cfg.seed, verbose=False)
    with tempfile.TemporaryDirectory() as trial_dir:
        system = threestudio_mv.find(cfg.system_type)(cfg.system, trial_dir=trial_dir)
        datamodule = threestudio_mv.find(cfg.data_type)(cfg.data)
        timer = StepTimer()
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer = pl.Trainer(
            max_steps=steps, accelerator="gpu" if gpu else "cpu", devices=1, logger=False, callbacks=[timer],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, precision=cfg.trainer.precision,
        )
        trainer.fit(system, datamodule=datamodule)
    timed = timer.seconds[warmup:]
    result = {
        "seconds_per_step": statistics.median(timed), "mean": statistics.fmean(timed), "min": min(timed),
        "max": max(timed), "steps_timed": len(timed),
    }
    if gpu:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def add_timing_arguments(parser: argparse.ArgumentParser, steps: int, warmup: int, steps_help: str = "") -> None:
    """``--steps``, ``--warmup`` and ``--gpu``, as :func:`start_timing` reads them."""
    parser.add_argument("--steps", type=int, default=steps, help=steps_help or None)
    parser.add_argument("--warmup", type=int, default=warmup, help="first steps not timed")
    parser.add_argument("--gpu", action="store_true", help="run on CUDA (falls back to CPU without it)")


def start_timing(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Tuple[bool, str]:
    """Check the timing arguments and quiet the libraries; returns (use the GPU, device name)."""
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    quiet_libraries()
    gpu = args.gpu and torch.cuda.is_available()
    return gpu, torch.cuda.get_device_name(0) if gpu else f"cpu ({torch.get_num_threads()} threads)"


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="render sizes (pixels per side)")
    add_timing_arguments(parser, steps=40, warmup=25)
    args = parser.parse_args()
    gpu, device = start_timing(parser, args)
    results: Dict[str, Any] = {
        "device": device,
        "config": str(CONFIG.relative_to(REPO)), "views_per_step": 4, "by_size": {},
    }
    for size in args.sizes:
        sds, x0 = (
            time_steps(
                [f"data.width={size}", f"data.height={size}", f"system.guidance.recon_loss={recon_loss}",
                 f"system.prompt_processor.prompt={PROMPT}"],
                args.steps, args.warmup, gpu,
            )
            for recon_loss in ("false", "true")
        )
        results["by_size"][str(size)] = {
            "sds (baseline)": sds, "x0_sds": x0,
            "x0_over_sds": x0["seconds_per_step"] / sds["seconds_per_step"],
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
