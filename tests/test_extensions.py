"""Plug-ins: a package under extensions/ (the checkout's, the working directory's, or a folder in
$THREESTUDIO_MV_EXTENSIONS) registers modules that configs can use; a broken one is one line."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import threestudio_mv
from threestudio_mv.launch import check_system_keys, import_extensions
from threestudio_mv.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PLUGIN = '''
from dataclasses import dataclass
import threestudio_mv
from threestudio_mv.models.background.solid_color import SolidColorBackground

@threestudio_mv.register("{name}")
class Grey(SolidColorBackground):
    @dataclass
    class Config(SolidColorBackground.Config):
        grey_level: float = 0.5
'''


def write_plugin(folder: Path, package: str, body: str) -> None:
    (folder / package).mkdir(parents=True)
    (folder / package / "__init__.py").write_text(body)


def test_a_plugin_in_the_working_directory_registers_a_module_a_config_can_use(tmp_path, monkeypatch):
    write_plugin(tmp_path / "extensions", "grey_plugin_cwd", PLUGIN.format(name="test-grey-cwd"))
    monkeypatch.chdir(tmp_path)
    assert "grey_plugin_cwd" in import_extensions()
    background = threestudio_mv.find("test-grey-cwd")({"grey_level": 0.3})
    assert background.cfg.grey_level == 0.3
    config = {"system_type": "mvdream-system", "system": {"background_type": "test-grey-cwd", "background": {"grey_levl": 1}}}
    with pytest.raises(UserError, match="system.background.grey_levl"):
        check_system_keys(OmegaConf.create(config))


def test_plugin_folders_from_the_environment_and_a_broken_plugin(tmp_path, monkeypatch):
    write_plugin(tmp_path / "more", "grey_plugin_env", PLUGIN.format(name="test-grey-env"))
    monkeypatch.setenv("THREESTUDIO_MV_EXTENSIONS", str(tmp_path / "more"))
    assert "grey_plugin_env" in import_extensions()
    assert threestudio_mv.find("test-grey-env") is not None
    write_plugin(tmp_path / "broken", "needs_missing_dependency", "import a_package_nobody_has\n")
    monkeypatch.setenv("THREESTUDIO_MV_EXTENSIONS", str(tmp_path / "broken"))
    with pytest.raises(UserError, match="needs_missing_dependency.*does not import"):
        import_extensions()


def test_the_example_plugin_blends_ground_into_sky_by_elevation():
    import_extensions()
    background = threestudio_mv.find("sky-gradient")({"ground": [0.0, 0.0, 0.0], "sky": [1.0, 1.0, 1.0], "band": 0.5})
    dirs = torch.tensor([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.25 / (1 - 0.0625) ** 0.5]])
    colour = background(dirs)[:, 0]
    assert colour.tolist() == pytest.approx([0.0, 0.5, 1.0, 0.75], abs=1e-5)
    with pytest.raises(UserError, match="system.background.band"):
        threestudio_mv.find("sky-gradient")({"band": 0.0})


@pytest.mark.slow
def test_launch_trains_with_the_example_plugin_from_another_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "--config", "mvdream-coarse", "--train", f"exp_root_dir={tmp_path}",
         "trainer.max_steps=2", "trainer.enable_progress_bar=false", "trainer.val_check_interval=1000", "use_timestamp=false",
         "tag=sky", "system.background_type=sky-gradient", "system.prompt_processor.prompt=a red cube"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = OmegaConf.load(next(tmp_path.glob("**/sky/configs/parsed.yaml")))
    assert parsed.system.background_type == "sky-gradient" and "color" not in parsed.system.background
