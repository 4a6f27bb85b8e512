"""Evaluate reconstruction from posed views against the procedural ground truth, stage by stage.

    python -m threestudio_mv.eval.reconstruction [--captions "a red chair with black legs" ...] \
        [--configs reconstruction reconstruction-mesh] [--views 16] [--size 64] [--out DIR] [--jobs 2]

For each caption: renders ``--views`` posed views at ``--size`` px (the procedural renderer's orbit,
``transforms.json``), fits each config to them (a volume; the volume then its refined mesh) and scores
the exported mesh like the text-to-3D evaluation: volumetric IoU, Chamfer-L1, surface colour delta-E,
and the mesh's largest piece, watertightness and mean adjacent-normal angle. Prints JSON, writes
``results.json`` and ``table.md``. The default captions are thin objects (chair, table, lamp), where a
volume's marching-cubes export loses most.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from threestudio_mv.eval.metrics import mesh_from_export
from threestudio_mv.eval.text_to_3d import mesh_metrics
from threestudio_mv.utils.errors import UserError, exit_on_user_error
from threestudio_mv.utils.io import save_json
from threestudio_mv.utils.trial import run_trial, slug, thread_env

DEFAULT_CAPTIONS = ["a red chair with black legs", "a brown table with white legs", "a blue lamp with a yellow shade"]
METRICS = ("iou", "chamfer_l1", "delta_e", "largest_piece_area", "mean_normal_angle_deg")


def render_views(caption: str, folder: Path, views: int, size: int) -> Path:
    """The procedural renderer's posed views of ``caption`` (its CLI, as a user would run it)."""
    if not (folder / "transforms.json").is_file():
        command = [sys.executable, "-m", "threestudio_mv.data.procedural", "render", "--prompt", caption,
                   "--views", str(views), "--size", str(size), "--out", str(folder)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"rendering '{caption}' failed: {result.stderr.strip().splitlines()[-1:]}")
    return folder


def fit_and_score(config: str, caption: str, views: Path, out: Path, threads: int, overrides: List[str]) -> Dict[str, Any]:
    """Fit one config to one caption's views; its scores (or the error) and seconds."""
    env = thread_env(threads)
    start = time.time()
    run = run_trial(["--config", config, "--train", "--export", f"data.root={views}", f"exp_root_dir={out}",
                     f"name={Path(config).stem}", f"tag={slug(caption)}", "use_timestamp=false",
                     "trainer.enable_progress_bar=false", *overrides], env=env)
    row: Dict[str, Any] = {"caption": caption, "config": Path(config).stem, "seconds": time.time() - start}
    if run.returncode != 0 or run.export_dir is None:
        return {**row, "error": run.stderr.strip().splitlines()[-1:]}
    return {**row, "export": str(run.export_dir), **mesh_metrics(mesh_from_export(run.export_dir), caption)}


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    summary: Dict[str, Any] = {}
    for config in dict.fromkeys(row["config"] for row in rows):
        done = [row for row in rows if row["config"] == config and "error" not in row]
        summary[config] = {f"mean_{key}": float(np.mean([row[key] for row in done])) if done else None for key in METRICS}
        summary[config].update({"runs": len(done), "watertight": f"{sum(r['watertight'] for r in done)}/{len(done)}",
                                "mean_seconds": float(np.mean([r["seconds"] for r in done])) if done else None})
    return summary


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| caption | config | IoU | Chamfer-L1 | delta-E | largest piece | normal angle (deg) | watertight | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['caption']} | {row['config']} | failed: {row['error']} ||||||| |")
            continue
        lines.append(f"| {row['caption']} | {row['config']} | {row['iou']:.3f} | {row['chamfer_l1']:.4f} | {row['delta_e']:.1f} | "
                     f"{row['largest_piece_area']:.3f} | {row['mean_normal_angle_deg']:.1f} | {row['watertight']} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", nargs="+", default=DEFAULT_CAPTIONS)
    parser.add_argument("--configs", nargs="+", default=["reconstruction", "reconstruction-mesh"])
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default="outputs/eval-reconstruction")
    parser.add_argument("--jobs", type=int, default=1, help="fits run at once")
    args, overrides = parser.parse_known_args(argv)
    if args.jobs < 1 or args.views < 2 or args.size < 8:
        raise UserError("--jobs must be >= 1, --views >= 2 and --size >= 8")
    from threestudio_mv.data.procedural import parse_caption
    from threestudio_mv.launch import find_config

    for caption in args.captions:
        parse_caption(caption)  # a UserError naming the caption when it is not in the vocabulary
    configs = [str(find_config(config)) for config in args.configs]
    out = Path(args.out).resolve()
    views = {caption: render_views(caption, out / "views" / slug(caption), args.views, args.size) for caption in args.captions}
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [(config, caption) for caption in args.captions for config in configs]
    rows: List[Dict[str, Any]] = []
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on CLI subprocesses
        for row in pool.map(lambda job: fit_and_score(job[0], job[1], views[job[1]], out, threads, overrides), jobs):
            rows.append(row)
            save_json(out / "results.json", {"rows": rows, "summary": summarise(rows)})
    (out / "table.md").write_text(markdown_table(rows))
    print(json.dumps(summarise(rows), indent=2))


if __name__ == "__main__":
    main()
