"""The whole-run progress bar: total = max_steps, and a resumed run's rate counts only its own steps."""
import time
from types import SimpleNamespace

from threestudio_mv.utils.trainer import StepProgressBar


def test_resumed_run_starts_at_its_step_without_counting_it_as_speed() -> None:
    bar = StepProgressBar(refresh_rate=1)
    bar.train_progress_bar = bar.init_train_tqdm()
    trainer = SimpleNamespace(max_steps=1000, global_step=600, current_epoch=0)
    bar._whole_run(trainer)
    tqdm_bar = bar.train_progress_bar
    assert tqdm_bar.total == 1000 and tqdm_bar.n == 600 and tqdm_bar.initial == 600
    time.sleep(0.05)
    tqdm_bar.update(5)
    rate = tqdm_bar.format_dict["rate"] or (tqdm_bar.n - tqdm_bar.initial) / tqdm_bar.format_dict["elapsed"]
    # 5 steps in >= 0.05 s: at most ~100 steps/s, whereas counting the 600 resumed steps gives > 10,000.
    assert rate < 200
    tqdm_bar.close()
