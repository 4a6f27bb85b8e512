"""Text-to-3D end to end on the bundled model: a short run writes a mesh; resume continues a trial;
the same seed gives the same weights."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trimesh

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "trainer.enable_progress_bar=false", "trainer.val_check_interval=1000", "use_timestamp=false",
    "system.geometry.isosurface_resolution=48", "system.exporter.texture_size=128",
    "system.prompt_processor.prompt=a yellow cone",
]


def launch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "--config", str(REPO / "configs/mvdream.yaml"),
         f"exp_root_dir={tmp_path}", *TINY, *args],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_short_run_writes_a_textured_mesh(tmp_path):
    launch(tmp_path, "--train", "--export", "trainer.max_steps=30", "tag=cone")
    export = tmp_path / "mvdream" / "cone" / "save" / "it30-export"
    for name in ("model.obj", "model.mtl", "texture_kd.png", "model.glb"):
        assert (export / name).is_file(), name
    mesh = trimesh.load(export / "model.obj", force="mesh")
    assert len(mesh.faces) > 50 and mesh.visual.uv is not None
    checkpoint = weights(tmp_path / "mvdream" / "cone" / "ckpts" / "last.ckpt")
    assert not any(key.startswith("guidance") for key in checkpoint["state_dict"])  # guidance never saved


@pytest.mark.slow
def test_resume_continues_the_same_trial_and_seed_is_deterministic(tmp_path):
    launch(tmp_path, "--train", "trainer.max_steps=10", "checkpoint.every_n_train_steps=5", "tag=a")
    trial = tmp_path / "mvdream" / "a"
    launch(tmp_path, "--train", "trainer.max_steps=20", f"resume={trial / 'ckpts' / 'last.ckpt'}", "tag=a")
    resumed = weights(trial / "ckpts" / "last.ckpt")
    assert resumed["global_step"] == 20
    launch(tmp_path, "--test", f"resume={trial / 'ckpts' / 'last.ckpt'}", "tag=a", "data.n_test_views=2")
    assert (trial / "save" / "it20-test-000.png").is_file()  # named by the checkpoint's step, not 0
    assert len(list((trial / "csv_logs").glob("run-*/metrics.csv"))) >= 1

    launch(tmp_path, "--train", "trainer.max_steps=10", "tag=b")
    first = weights(trial / "ckpts" / "step000010.ckpt")["state_dict"]
    again = weights(tmp_path / "mvdream" / "b" / "ckpts" / "last.ckpt")["state_dict"]
    assert again.keys() == first.keys()
    for key, value in again.items():
        assert torch.allclose(value.float(), first[key].float()), key


@pytest.mark.slow
def test_texture_phase_freezes_the_shape_and_trains_the_colour(tmp_path):
    # --test renders with analytic normals, which need autograd in eval (no inference mode)
    launch(tmp_path, "--train", "--test", "trainer.max_steps=12", "checkpoint.every_n_train_steps=6", "tag=tex",
           "system.freeze_geometry_step=6", "data.n_test_views=2", "system.lr_scale=[[0,1],[6,1],[12,0.1]]",
           "system.geometry.normal_type=analytic")
    assert (tmp_path / "mvdream" / "tex" / "save" / "it12-test.mp4").is_file()
    ckpts = tmp_path / "mvdream" / "tex" / "ckpts"
    before, after = weights(ckpts / "step000006.ckpt")["state_dict"], weights(ckpts / "step000012.ckpt")["state_dict"]
    shape = [key for key in before if key.startswith(("geometry.encoding", "geometry.density_network"))]
    colour = [key for key in before if key.startswith("geometry.feature_network")]
    assert shape and colour
    for key in shape:
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[key], after[key]) for key in colour)
    lrs = [weights(ckpts / f"step0000{step:02d}.ckpt")["optimizer_states"][0]["param_groups"][0]["lr"] for step in (6, 12)]
    assert lrs[0] == pytest.approx(0.01)  # lr_scale anneals only the texture phase: 1 -> 0.1 over steps 6-12
    assert 0.01 * 0.1 <= lrs[1] <= 0.01 * 0.25 + 1e-9, lrs  # the scale of step 12, or of step 11 before it ran
