"""End to end: fit posed renders of a procedural asset, export, compare with its ground truth."""
import subprocess
import sys
from pathlib import Path

import pytest
import trimesh

REPO = Path(__file__).resolve().parents[1]
CAPTION = "a red mushroom with a white stem"


@pytest.mark.slow
def test_reconstruction_recovers_the_coloured_mesh(tmp_path):
    from threestudio_mv.eval.text_to_3d import latest_export, mesh_metrics
    from threestudio_mv.eval.metrics import mesh_from_export

    data = tmp_path / "views"
    subprocess.run(
        [sys.executable, "-m", "threestudio_mv.data.procedural", "render", "--prompt", CAPTION,
         "--views", "16", "--size", "64", "--out", str(data)],
        cwd=REPO, check=True, capture_output=True,
    )
    result = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "--config", str(REPO / "configs/reconstruction.yaml"),
         "--train", "--export", f"data.root={data}", f"exp_root_dir={tmp_path}", "tag=mushroom",
         "use_timestamp=false", "trainer.enable_progress_bar=false"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    export = latest_export(tmp_path / "reconstruction" / "mushroom")
    for name in ("model.obj", "model.mtl", "texture_kd.png", "model.glb"):
        assert (export / name).is_file()
    glb = trimesh.load(export / "model.glb", force="mesh")
    assert glb.visual.uv is not None and len(glb.faces) > 100
    metrics = mesh_metrics(mesh_from_export(export), CAPTION)
    print(metrics)
    assert metrics["chamfer_l1"] <= 0.02
    assert metrics["iou"] >= 0.8
    assert metrics["delta_e"] <= 10.0
