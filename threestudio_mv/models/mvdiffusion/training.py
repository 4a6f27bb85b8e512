"""The bookkeeping of a model-family training run, written once: AdamW, diffusers' warm-up + cosine
learning rate (or a given lr factor), an EMA of the weights (optional), gradient clipping (optional),
the run's random generators, an atomic checkpoint every ``ckpt_every`` steps with resume from it, a
loss log (``log.csv``: step, mean loss, unix time) and a progress bar with a total. What a step *is*
(data, noise, loss) stays with each model.
"""
import contextlib
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from threestudio_mv.utils.io import atomic_path


class TrainingRun:
    """Optimiser, schedule, EMA and generators of ``trained`` (its parameters that need gradients: a
    frozen part stays out of the optimiser), resumed from ``<out>/ckpt.pt`` when there is one. Call
    :meth:`step` with each step's loss; it returns True when it has just written a checkpoint (the
    moment to export).

    ``ema_decay`` None: no EMA (:meth:`ema_weights` gives the live weights). ``lr_factor``: the lr
    multiplier at a step (``LambdaLR``) instead of diffusers' warm-up + cosine to 0 over ``steps``
    (``warmup`` is then unused). ``max_grad_norm`` None: no gradient clipping."""

    def __init__(
        self, trained: nn.Module, out: Path, steps: int, lr: float, warmup: int = 100, ema_decay: Optional[float] = 0.995,
        ckpt_every: int = 100, seed: int = 0, desc: str = "train", extra: Optional[Dict[str, Any]] = None,
        lr_factor: Optional[Callable[[int], float]] = None, max_grad_norm: Optional[float] = 1.0,
    ) -> None:
        self.trained, self.out, self.steps, self.ckpt_every = trained, Path(out), steps, ckpt_every
        self.max_grad_norm = max_grad_norm
        self.out.mkdir(parents=True, exist_ok=True)
        self.params = [p for p in trained.parameters() if p.requires_grad]
        self.ema = (
            AveragedModel(trained, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True) if ema_decay is not None else None
        )
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.01)
        if lr_factor is None:
            self.schedule = get_cosine_schedule_with_warmup(self.optimizer, warmup, steps)
        else:
            self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.extra: Dict[str, Any] = dict(extra or {})  # saved with the checkpoint (e.g. model metadata)
        self.step_count = 0
        self._losses: List[float] = []
        ckpt = self.out / "ckpt.pt"
        if ckpt.is_file():
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            trained.load_state_dict(state["trained"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            self.rng.setstate(state["rng"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            self.extra = state.get("extra", {})
            self.step_count = state["step"]
            print(f"resumed {desc} from step {self.step_count}")
        self.bar = tqdm(total=steps, initial=self.step_count, desc=desc, mininterval=10.0)

    @property
    def done(self) -> bool:
        return self.step_count >= self.steps

    def step(self, loss: Tensor) -> bool:
        """Backward, clip to ``max_grad_norm``, optimiser + schedule + EMA step; checkpoint when due."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        if self.ema is not None:
            self.ema.update_parameters(self.trained)
        self.step_count += 1
        self._losses.append(loss.item())
        self.bar.update(1)
        recent = self._losses[-50:]
        self.bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
        if self.step_count % self.ckpt_every and not self.done:
            return False
        self.save()
        return True

    def save(self) -> None:
        """Write the checkpoint atomically and append the mean loss since the last one to ``log.csv``."""
        with atomic_path(self.out / "ckpt.pt") as tmp:
            torch.save({
                "trained": self.trained.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(), "rng": self.rng.getstate(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(), "extra": self.extra,
                "step": self.step_count,
            }, tmp)
        if self._losses:
            with open(self.out / "log.csv", "a") as handle:
                handle.write(f"{self.step_count},{sum(self._losses) / len(self._losses):.5f},{time.time():.0f}\n")
        self._losses = []

    def logged_losses(self) -> List[float]:
        """The mean losses of ``log.csv``, one per checkpoint."""
        log = self.out / "log.csv"
        return [float(line.split(",")[1]) for line in log.read_text().splitlines()] if log.is_file() else []

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[nn.Module]:
        """The trained module with the EMA weights in it for the block (e.g. to export); the live weights
        after. Without an EMA, the trained module as it is."""
        if self.ema is None:
            yield self.trained
            return
        live = {k: v.clone() for k, v in self.trained.state_dict().items()}
        self.trained.load_state_dict(self.ema.module.state_dict())
        try:
            yield self.trained
        finally:
            self.trained.load_state_dict(live)

    def close(self) -> None:
        self.bar.close()
