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

import sds_step  # bench/ is the script's directory; importing it puts the repository on sys.path
from threestudio_mv.utils.errors import exit_on_user_error  # noqa: E402

OFF = ["system.renderer.prune_alpha_threshold=0.0", "system.renderer.prune_early_stop_eps=0.0"]


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", nargs="+", default=["a red sphere", "a blue mug"])
    sds_step.add_timing_arguments(parser, steps=300, warmup=20, steps_help="steps per run (the geometry phase is 0-500)")
    args = parser.parse_args()
    gpu, device = sds_step.start_timing(parser, args)
    results: Dict[str, Any] = {"device": device, "steps": args.steps, "by_prompt": {}}
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
