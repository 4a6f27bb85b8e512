"""bench/gpu.py --smoke: the GPU benchmark's code path at toy size on the CPU, JSON with every figure."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_smoke_prints_every_figure(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "bench/gpu.py", "--smoke"], cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["smoke"] is True and report["config"] == "configs/mvdream-sd21.yaml"
    assert report["model"]["weights"] == "random" and report["model"]["parameters_millions"] > 0
    (runs,) = report["sd21"].values()
    for name in ("recipe", "naive (baseline)"):
        assert runs[name]["steps_per_second"] > 0 and runs[name]["steps_timed"] == 1, name
    assert runs["speed_up"] == pytest.approx(runs["recipe"]["steps_per_second"] / runs["naive (baseline)"]["steps_per_second"])
    assert report["bundled_default"]["glb_written"] and report["bundled_default"]["seconds_per_asset"] > 0
