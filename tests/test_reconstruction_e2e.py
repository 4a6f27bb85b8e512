"""Reconstruction end to end (issue 3's acceptance run): 16 views of a procedural asset in, a textured
mesh out that matches the asset's ground truth."""
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CAPTION = "a red mushroom with a white stem"


def run(*args: str) -> None:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_reconstruction_recovers_the_coloured_mesh(tmp_path: Path) -> None:
    from threestudio_mv.data.procedural import asset_mesh, parse_caption
    from threestudio_mv.eval.metrics import chamfer_l1, mesh_from_export, surface_colour_error, volumetric_iou

    views = tmp_path / "views"
    run("-m", "threestudio_mv.data.procedural", "render", "--prompt", CAPTION, "--views", "16", "--size", "64",
        "--out", str(views))
    start = time.time()
    run("launch.py", "--config", "configs/reconstruction.yaml", "--train", "--export", f"data.root={views}",
        f"exp_root_dir={tmp_path}", "tag=mushroom", "use_timestamp=false", "trainer.enable_progress_bar=false")
    seconds = time.time() - start

    export = tmp_path / "reconstruction" / "mushroom" / "save" / "it300-export"
    pred = mesh_from_export(export)
    asset = parse_caption(CAPTION)
    gt = asset_mesh(asset)
    bounds = (np.minimum(pred.bounds[0], gt.bounds[0]), np.maximum(pred.bounds[1], gt.bounds[1]))
    iou = volumetric_iou(pred, asset.sdf, resolution=64, bounds=bounds)
    chamfer = chamfer_l1(pred, gt)
    delta_e = surface_colour_error(pred, asset.albedo, gt_geometry=gt)
    print(f"reconstruction: {seconds:.0f} s, IoU {iou:.3f}, Chamfer-L1 {chamfer:.4f}, delta-E {delta_e:.1f}")
    # Measured (2 CPU cores, ~2 min 15 s): IoU 0.88, Chamfer-L1 0.009, delta-E 6.1 (colours sampled 0.02
    # inside the surface; 10.1 on it, where the never-seen underside of the cap was pink).
    assert chamfer <= 0.02 and iou >= 0.8 and delta_e <= 10.0, (iou, chamfer, delta_e)
