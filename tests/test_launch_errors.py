"""launch.py turns user mistakes into one line on stderr and exit code 2, never a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_launch(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "trial.yaml"
    path.write_text("name: t\nsystem_type: reconstruction-system\ndata_type: posed-images-datamodule\n")
    return path


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_missing_config_file(tmp_path):
    assert_one_line_error(run_launch("--config", str(tmp_path / "none.yaml"), "--train"), "none.yaml")


def test_no_mode_given(config):
    assert_one_line_error(run_launch("--config", str(config)), "--train")


def test_unknown_top_level_key(config):
    assert_one_line_error(run_launch("--config", str(config), "--train", "trainer.max_stepz=3"), "trainer.max_stepz", "max_steps")


def test_wrong_type(config):
    assert_one_line_error(run_launch("--config", str(config), "--train", "trainer.max_steps=lots"), "trainer.max_steps", "lots")


def test_missing_checkpoint(config, tmp_path):
    assert_one_line_error(run_launch("--config", str(config), "--export", f"resume={tmp_path}/x.ckpt"), "x.ckpt")


def test_export_needs_a_trial(config):
    assert_one_line_error(run_launch("--config", str(config), "--export"), "resume=")


def test_unknown_system_type(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("system_type: no-such-system\ndata_type: posed-images-datamodule\n")
    assert_one_line_error(run_launch("--config", str(path), "--train"), "no-such-system")


def test_each_ddp_rank_gets_its_own_seed(monkeypatch):
    from threestudio_mv.launch import process_seed

    for key in ("RANK", "GLOBAL_RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert process_seed(7) == 7
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_seed(7) == 8
    monkeypatch.setenv("RANK", "3")
    assert process_seed(7) == 10


def test_malformed_yaml_bad_precision_and_bad_gpu_are_one_line(tmp_path, config):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\nsystem: {a: 1\n")
    assert_one_line_error(run_launch("--config", str(broken), "--train"), "not valid YAML")
    assert_one_line_error(run_launch("--config", str(config), "--train", "trainer.precision=bogus"), "trainer.precision", "bogus")
    assert_one_line_error(run_launch("--config", "mvdream-coarse", "--train", "--gpu", "a",
                                     "system.prompt_processor.prompt=a red cube", f"exp_root_dir={tmp_path}"), "--gpu")


@pytest.mark.slow
def test_resuming_another_configs_checkpoint_is_one_line(tmp_path):
    common = ["system.prompt_processor.prompt=a red cube", f"exp_root_dir={tmp_path}", "use_timestamp=false",
              "trainer.enable_progress_bar=false", "tag=t"]
    done = run_launch("--config", "mvdream-coarse", "--train", "trainer.max_steps=2", *common)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = tmp_path / "mvdream-coarse" / "t" / "ckpts" / "last.ckpt"
    result = run_launch("--config", "mvdream-coarse", "--train", "trainer.max_steps=4", f"resume={checkpoint}",
                        "system.geometry.pos_encoding_config.resolution=32", *common)
    assert_one_line_error(result, "another config", "geometry.encoding")


def test_a_trial_folder_without_stages_asks_for_the_checkpoint(tmp_path):
    (tmp_path / "trial").mkdir()
    assert_one_line_error(run_launch("--test", f"resume={tmp_path / 'trial'}"), "ckpts/last.ckpt")
