"""Text-to-3D end to end on the bundled model: a short staged run writes a mesh; a staged trial and a
single stage resume; the same seed gives the same weights; a stage's bad key is one line."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from threestudio_mv.utils.io import save_image

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "trainer.enable_progress_bar=false", "trainer.val_check_interval=1000", "use_timestamp=false",
    "system.geometry.isosurface_resolution=48", "system.exporter.texture_size=128",
    "system.prompt_processor.prompt=a yellow cone",
]


def launch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """launch.py with the default config (unless args give --config) at tiny settings."""
    config = [] if "--config" in args else ["--config", str(REPO / "configs/mvdream.yaml")]
    result = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *config, f"exp_root_dir={tmp_path}", *TINY, *args],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)


STAGES = ["stages.refine.trainer.max_steps=4", "stages.texture.trainer.max_steps=4"]


@pytest.mark.slow
def test_staged_run_writes_a_textured_mesh_from_the_refined_surface(tmp_path):
    launch(tmp_path, "--train", "--export", "trainer.max_steps=30", *STAGES, "tag=cone")
    trial = tmp_path / "mvdream" / "cone"
    export = trial / "texture" / "save" / "it4-export"
    for name in ("model.obj", "model.mtl", "texture_kd.png", "model.glb"):
        assert (export / name).is_file(), name
    mesh = trimesh.load(export / "model.obj", force="mesh")
    assert len(mesh.faces) > 50 and mesh.visual.uv is not None
    glb = trimesh.load(export / "model.glb", force="mesh")
    assert len(glb.faces) == len(mesh.faces)
    coarse, refine, texture = (weights(trial / stage / "ckpts" / "last.ckpt") for stage in ("coarse", "refine", "texture"))
    for checkpoint in (coarse, refine, texture):
        assert not any(key.startswith("guidance") for key in checkpoint["state_dict"])  # guidance never saved
    assert any(key.startswith("geometry.density_network") for key in coarse["state_dict"])  # a volume
    # the refine stage moved the surface; the texture stage kept it and trained only the colour
    assert torch.equal(refine["state_dict"]["geometry.sdf"], texture["state_dict"]["geometry.sdf"])
    colour = [key for key in texture["state_dict"] if key.startswith("geometry.feature_network")]
    assert colour and any(not torch.equal(refine["state_dict"][k], texture["state_dict"][k]) for k in colour)
    assert (trial / "configs" / "raw.yaml").is_file() and (trial / "cmd.txt").is_file()


@pytest.mark.slow
def test_a_staged_trial_resumes_only_its_unfinished_stages(tmp_path):
    launch(tmp_path, "--train", "trainer.max_steps=10", *STAGES, "tag=a")
    trial = tmp_path / "mvdream" / "a"
    finished = {stage: (trial / stage / "ckpts" / "last.ckpt").stat().st_mtime_ns for stage in ("coarse", "refine")}
    result = launch(tmp_path, "--train", f"resume={trial}", "trainer.max_steps=10", "stages.refine.trainer.max_steps=4",
                    "stages.texture.trainer.max_steps=8")
    assert "stage 3/3: texture" in result.stdout and "stage 1/3" not in result.stdout
    for stage, mtime in finished.items():
        assert (trial / stage / "ckpts" / "last.ckpt").stat().st_mtime_ns == mtime, stage
    assert weights(trial / "texture" / "ckpts" / "last.ckpt")["global_step"] == 8
    tested = launch(tmp_path, "--test", f"resume={trial}", "data.n_test_views=2")
    assert (trial / "texture" / "save" / "it8-test-000.png").is_file()  # named by the checkpoint's step
    assert f"test turntable: {trial / 'texture' / 'save' / 'it8-test.mp4'}" in tested.stdout  # says where it went
    # The trial alone (no --config) is enough, and the turntable can be shown in a panorama instead.
    panorama = np.zeros((16, 32, 3), dtype=np.float32)
    panorama[..., 2] = 1.0  # all blue
    save_image(tmp_path / "room.png", panorama)
    again = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "--test", f"resume={trial}", "data.n_test_views=2",
         "system.background_type=panorama-environment-map", f"system.background.image={tmp_path / 'room.png'}"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    corner = np.asarray(Image.open(trial / "texture" / "save" / "it8-test-000.png"))[0, 0, :3]
    assert corner[2] > 200 and corner[0] < 50  # the background is the panorama's blue, not white


@pytest.mark.slow
def test_a_stage_resumes_alone_and_the_seed_is_deterministic(tmp_path):
    coarse = ["--config", str(REPO / "configs/mvdream-coarse.yaml")]
    launch(tmp_path, *coarse, "--train", "trainer.max_steps=10", "checkpoint.every_n_train_steps=5", "tag=a")
    trial = tmp_path / "mvdream-coarse" / "a"
    launch(tmp_path, *coarse, "--train", "trainer.max_steps=20", f"resume={trial / 'ckpts' / 'last.ckpt'}", "tag=a")
    assert weights(trial / "ckpts" / "last.ckpt")["global_step"] == 20
    assert len(list((trial / "csv_logs").glob("run-*/metrics.csv"))) >= 1

    launch(tmp_path, *coarse, "--train", "trainer.max_steps=10", "tag=b")
    first = weights(trial / "ckpts" / "step000010.ckpt")["state_dict"]
    again = weights(tmp_path / "mvdream-coarse" / "b" / "ckpts" / "last.ckpt")["state_dict"]
    assert again.keys() == first.keys()
    for key, value in again.items():
        assert torch.allclose(value.float(), first[key].float()), key


def test_an_unknown_key_of_one_stage_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "--config", "mvdream", "--train", f"exp_root_dir={tmp_path}",
         "system.prompt_processor.prompt=a red cube", "stages.refine.system.geometry.grid_resolutoin=32"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "grid_resolutoin" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "--config", "mvdream", "--train", "stages.nosuch.seed=1"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 2 and "no such stage" in result.stderr and "coarse, refine, texture" in result.stderr
