"""``pip install .`` gives a ``threestudio-mv`` command that works from any directory: bundled configs by
name, the bundled model found inside the package, results where the user runs it."""
import subprocess
import sys
from pathlib import Path

import pytest
import trimesh

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_command_runs_the_default_from_another_directory(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(REPO)],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    result = subprocess.run(
        [str(venv / "bin" / "threestudio-mv"), "--config", "mvdream", "--train", "--export",
         "system.prompt_processor.prompt=a red cube", "trainer.max_steps=20", "stages.refine.trainer.max_steps=3",
         "stages.texture.trainer.max_steps=3", "system.exporter.texture_size=64", "trainer.enable_progress_bar=false",
         "use_timestamp=false", "system.geometry.isosurface_resolution=48"],
        cwd=work, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    glb = work / "outputs" / "mvdream" / "a_red_cube" / "texture" / "save" / "it3-export" / "model.glb"
    assert f"exported glb: {glb}" in result.stdout
    assert len(trimesh.load(glb, force="mesh").faces) > 50
    # the package, not this checkout, served the run
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import threestudio_mv; print(threestudio_mv.__file__)"],
                           cwd=work, capture_output=True, text=True)
    assert str(venv) in where.stdout
