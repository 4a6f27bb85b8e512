"""The official-weights recipe on a GPU, against naive settings, and the bundled default's time per asset; JSON.

One prepared script for a lent GPU (it uses CUDA when present):

- ``configs/mvdream-sd21.yaml`` with a random-weight model at SD-2.1-base MVDream's real size (UNet with the
  camera MLP, SD's VAE, a 23-layer CLIP text encoder; ``threestudio_mv.models.mvdiffusion.sd21``): training
  steps per second and peak GPU memory at each ``--sizes`` render size (the recipe's batch: 8 images at
  64 px, 4 at 256 px), for the recipe (its 16-mixed autocast, SDPA attention, nerfacc's occupancy-grid
  estimator, the grid filled from the start: no warm-up) and for the naive settings (32-true, no
  occupancy grid). sds_step.py's timer; the first ``--warmup`` steps are not timed.
- the bundled default (``configs/mvdream.yaml``): wall seconds of ``launch.py --train --export``, start
  to GLB, as a user runs it.

``--smoke`` runs the same code at toy size on the CPU (tiny model, 16 px, 2 steps, an asset of 1 step per
stage): CI checks the script, not the figures. (On a CPU, Lightning runs 16-mixed as bf16-mixed.)

    python bench/gpu.py [--sizes 64 256] [--steps 30] [--warmup 10] [--cache-dir DIR] [--smoke]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import sds_step  # bench/ is the script's directory; importing it puts the repository on sys.path
from threestudio_mv.models.mvdiffusion.sd21 import TINY, SD21Size, random_sd21_model  # noqa: E402
from threestudio_mv.utils.errors import exit_on_user_error  # noqa: E402

SD21_CONFIG = sds_step.REPO / "configs" / "mvdream-sd21.yaml"
RECIPE_BATCH = {64: 8}  # images per step by render size (the recipe's [8, 4] at [64, 256]); 4 otherwise
NAIVE = ["trainer.precision=32-true", "system.renderer.grid_prune=false"]
RECIPE = ["system.renderer.occupancy_warmup_steps=0"]
SMOKE = [  # toy field and renderer for the CPU
    "system.renderer.num_samples_per_ray=32", "system.geometry.pos_encoding_config.n_levels=4",
    "system.geometry.pos_encoding_config.log2_hashmap_size=12",
]
SMOKE_ASSET = ["trainer.max_steps=1", "system.geometry.isosurface_resolution=32", "system.exporter.texture_size=64"]


def time_recipe(model: Path, size: int, smoke: bool, args: argparse.Namespace, gpu: bool, cache: Path) -> Dict[str, Any]:
    """Steps/s and peak memory of the recipe and of the naive settings at one render size."""
    base = [
        f"system.guidance.pretrained_model_name_or_path={model}", f"system.prompt_processor.prompt={sds_step.PROMPT}",
        f"system.prompt_processor.cache_dir={cache}", f"data.width={size}", f"data.height={size}",
        f"data.batch_size={RECIPE_BATCH.get(size, 4) if not smoke else 4}", "data.resolution_milestones=[]",
        *(SMOKE if smoke else []),
    ]
    runs: Dict[str, Any] = {}
    for name, extra in (("recipe", RECIPE), ("naive (baseline)", NAIVE)):
        try:
            timing = sds_step.time_steps(base + extra, args.steps, args.warmup, gpu, config=SD21_CONFIG)
        except torch.cuda.OutOfMemoryError as error:
            runs[name] = {"error": f"out of memory: {error}".splitlines()[0]}
            torch.cuda.empty_cache()
            continue
        runs[name] = {**timing, "steps_per_second": 1.0 / timing["seconds_per_step"]}
    if all("steps_per_second" in run for run in runs.values()):
        runs["speed_up"] = runs["recipe"]["steps_per_second"] / runs["naive (baseline)"]["steps_per_second"]
    return runs


def time_asset(smoke: bool, gpu: bool, cache: Path) -> Dict[str, Any]:
    """Wall seconds of the bundled default's ``launch.py --train --export``, as a user runs it."""
    with tempfile.TemporaryDirectory() as outputs:
        command = [
            sys.executable, str(sds_step.REPO / "launch.py"), "--config", "configs/mvdream.yaml", "--train", "--export",
            f"exp_root_dir={outputs}", "use_timestamp=false", "trainer.enable_progress_bar=false",
            f"system.prompt_processor.prompt={sds_step.PROMPT}", f"system.prompt_processor.cache_dir={cache}",
            *(["--gpu", "0"] if gpu else []), *(SMOKE_ASSET if smoke else []),
        ]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=sds_step.REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"}
        exported = any(Path(outputs).glob("**/model.glb"))
    return {"seconds_per_asset": seconds, "glb_written": exported, "steps_per_stage": 1 if smoke else "the config's"}


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="render sizes (default 64 256; smoke 16)")
    parser.add_argument("--smoke", action="store_true", help="toy size on the CPU (CI)")
    parser.add_argument("--steps", type=int, default=30, help="steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="first steps not timed")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="text-embedding cache (default: a fresh one; a filled one spares loading the text encoder)")
    args = parser.parse_args(argv)
    args.gpu = not args.smoke  # CUDA when present (start_timing falls back to the CPU)
    if args.smoke:
        args.steps, args.warmup = 2, 1
    gpu, device = sds_step.start_timing(parser, args)
    size = TINY if args.smoke else SD21Size()
    sizes = args.sizes or ([16] if args.smoke else [64, 256])
    results: Dict[str, Any] = {
        "device": device, "smoke": args.smoke, "config": str(SD21_CONFIG.relative_to(sds_step.REPO)),
        "model": {"unet_channels": size.model_channels, "channel_mult": list(size.channel_mult),
                  "text_layers": size.clip_layers, "weights": "random"},
        "steps": args.steps, "warmup": args.warmup,
        "settings": {
            "recipe": "the config's 16-mixed autocast; SDPA attention; nerfacc OccGridEstimator on CUDA (dense "
                      "sampler on a CPU); occupancy grid from step 0",
            "naive (baseline)": "32-true; no occupancy grid",
        },
        "sd21": {},
    }
    with tempfile.TemporaryDirectory() as work:
        cache = args.cache_dir or Path(work) / "cache"
        model = random_sd21_model(Path(work) / "mvdream-sd21", size)
        results["model"]["parameters_millions"] = round(
            sum(path.stat().st_size for path in model.glob("*/*.safetensors")) / 4 / 1e6, 1
        )
        for render_size in sizes:
            results["sd21"][str(render_size)] = time_recipe(model, render_size, args.smoke, args, gpu, cache)
        results["bundled_default"] = time_asset(args.smoke, gpu, cache)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
