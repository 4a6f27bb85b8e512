"""Seconds per text-to-3D training step with density pruning (the default) against without it, as JSON.

For each prompt, fits the first ``--steps`` steps of ``configs/mvdream.yaml`` twice with Lightning
(sds_step.py's timer): the baseline without density pruning (``prune_alpha_threshold: 0``,
``prune_early_stop_eps: 0``: every sample in an occupied grid cell is rendered with gradient) and the
default (nerfacc's sigma_fn pruning: alpha >= 0.01, transmittance >= 1e-4). The first ``--warmup``
steps are not timed. Large solid objects gain most: their faint early haze fills the occupancy grid.

    python bench/density_pruning.py [--prompts "a red sphere" "a blue mug"] [--steps 300] [--warmup 20]
"""
import argparse
import json
from typing import Any, Dict

import torch

import sds_step  # bench/ is the script's directory; importing it puts the repository on sys.path
from launch import quiet_libraries  # noqa: E402
from threestudio_mv.utils.errors import exit_on_user_error  # noqa: E402

OFF = ["system.renderer.prune_alpha_threshold=0.0", "system.renderer.prune_early_stop_eps=0.0"]


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", nargs="+", default=["a red sphere", "a blue mug"])
    parser.add_argument("--steps", type=int, default=300, help="steps per run (the geometry phase is 0-500)")
    parser.add_argument("--warmup", type=int, default=20, help="first steps not timed")
    parser.add_argument("--gpu", action="store_true", help="run on CUDA (falls back to CPU without it)")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    quiet_libraries()
    gpu = args.gpu and torch.cuda.is_available()
    results: Dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if gpu else f"cpu ({torch.get_num_threads()} threads)",
        "steps": args.steps, "by_prompt": {},
    }
    for prompt in args.prompts:
        runs = {
            name: sds_step.time_steps([f"system.prompt_processor.prompt={prompt}", *extra], args.steps, args.warmup, gpu)
            for name, extra in (("no pruning (baseline)", OFF), ("density pruning (default)", []))
        }
        baseline, pruned = runs.values()
        runs["speed-up (mean step)"] = baseline["mean"] / pruned["mean"]
        results["by_prompt"][prompt] = runs
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
