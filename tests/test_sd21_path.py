"""The official-weights recipe, configs/mvdream-sd21.yaml, end to end on a CPU: a random-weight latent model
with SD-2.1-base MVDream's classes and config keys at tiny widths (VAE, UNet with the camera MLP, CLIP text
encoder + tokenizer), trained a few steps with the recipe's hash grid, neural environment map and
16-mixed precision, then exported."""
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trimesh

from threestudio_mv.models.mvdiffusion.sd21 import TINY, random_sd21_model

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
    "use_timestamp=false",
    "data.batch_size=4", "data.width=32", "data.height=32", "data.resolution_milestones=[]",
    "data.eval_width=32", "data.eval_height=32", "system.renderer.num_samples_per_ray=32",
    "system.geometry.pos_encoding_config.n_levels=4", "system.geometry.pos_encoding_config.log2_hashmap_size=12",
    "system.geometry.isosurface_resolution=32", "system.exporter.texture_size=64", "tag=cube",
    "system.prompt_processor.prompt=a red cube",
]


@pytest.mark.slow
def test_sd21_recipe_trains_and_exports_with_a_latent_clip_model(tmp_path: Path) -> None:
    model = random_sd21_model(tmp_path / "mvdream-sd21", TINY)
    result = subprocess.run(
        [sys.executable, "launch.py", "--config", "configs/mvdream-sd21.yaml", "--train", "--export",
         f"exp_root_dir={tmp_path / 'outputs'}", f"system.guidance.pretrained_model_name_or_path={model}", *SMALL],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trial = tmp_path / "outputs" / "mvdream-sd21" / "cube"
    assert "precision: 16-mixed" in (trial / "configs" / "parsed.yaml").read_text()  # the recipe's own precision
    mesh = trimesh.load(trial / "save" / "it3-export" / "model.glb", force="mesh")
    assert len(mesh.faces) > 0
    (metrics,) = (trial / "csv_logs").glob("run-*/metrics.csv")
    losses = [float(row["train/loss"]) for row in csv.DictReader(metrics.open()) if row.get("train/loss")]
    assert losses and all(math.isfinite(loss) for loss in losses)
