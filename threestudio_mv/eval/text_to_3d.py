"""Evaluate text-to-3D against the procedural ground truth.

    python -m threestudio_mv.eval.text_to_3d --configs mvdream mvdream-coarse \
        --split heldout --num 10 --out outputs/eval-t23d [--jobs 2] [--reuse] [key=value overrides for every run]

For each caption and config (a path or a bundled config's name; staged configs too): runs the CLI with
``--train --export --test``, loads the exported mesh and compares it with the asset's ground-truth
mesh: volumetric IoU, Chamfer-L1 (units of the GT bounding-box diagonal), mean surface colour error
(CIELAB delta-E) and, for assets with a front, the front score (below); and the mesh itself: the
share of its area in its largest connected piece, whether it is watertight and the mean angle
between adjacent face normals (metrics.mesh_quality). Prints a JSON summary and writes ``results.json``, ``table.md`` and
``first_frames.png`` (each run's first turntable frame: one row per caption, one column per config).
``--jobs N`` runs N trials at once, each with cores / N torch threads (tiny models scale badly
across threads, so 2 jobs of 1 thread beat 1 job of 2 on 2 cores); ``--reuse`` scores trials that
already have an export instead of rerunning them, and resumes a staged trial after its finished
stages (its ``seconds`` then count only the stages run).

Front score (Janus check): coloured Chamfer distance d(A, B) between surface samples (xyz plus 0.25 x
RGB). With R the half-turn about z, front = (d(R pred, gt) - d(pred, gt)) / d(R gt, gt). 1 = the
front is where it should be; ~0 = front and back look alike (a multi-face result); < 0 = turned
around. Only assets whose own half-turn is clearly different (d(R gt, gt) > 0.03 of the diagonal)
are scored; a result counts as single-faced when its score is > 0.5.
"""
import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from threestudio_mv.eval.metrics import (
    chamfer_l1,
    mesh_from_export,
    mesh_quality,
    reference_lattice,
    sample_coloured_surface,
    surface_colour_error,
    volumetric_iou,
)
from threestudio_mv.utils.errors import UserError, exit_on_user_error
from threestudio_mv.utils.io import save_json
from threestudio_mv.utils.trial import run_trial, thread_env
COLOUR_WEIGHT = 0.25
IOU_RESOLUTION = 96  # cells across the ground truth's longest side (metrics.reference_lattice)
FRONT_ASYMMETRY_MIN = 0.03
HALF_TURN = trimesh.transformations.rotation_matrix(np.pi, [0, 0, 1])


def coloured_chamfer(a: trimesh.Trimesh, b: trimesh.Trimesh, n_points: int = 8000, seed: int = 0) -> float:
    """Symmetric Chamfer distance of (xyz, 0.25 rgb) samples, in units of ``b``'s bbox diagonal."""
    pa, ca = sample_coloured_surface(a, n_points, seed)
    pb, cb = sample_coloured_surface(b, n_points, seed + 1)
    diagonal = float(np.linalg.norm(b.bounds[1] - b.bounds[0]))
    xa = np.concatenate([pa / diagonal, COLOUR_WEIGHT * ca], axis=1)
    xb = np.concatenate([pb / diagonal, COLOUR_WEIGHT * cb], axis=1)
    return float(0.5 * (cKDTree(xb).query(xa)[0].mean() + cKDTree(xa).query(xb)[0].mean()))


def half_turned(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    turned = mesh.copy()
    turned.apply_transform(HALF_TURN)
    return turned


def front_score(pred: trimesh.Trimesh, gt: trimesh.Trimesh) -> Optional[float]:
    """See the module docstring; None when the asset has no distinct front."""
    asymmetry = coloured_chamfer(half_turned(gt), gt)
    if asymmetry < FRONT_ASYMMETRY_MIN:
        return None
    return (coloured_chamfer(half_turned(pred), gt) - coloured_chamfer(pred, gt)) / asymmetry


def iou_on_reference_lattice(pred: trimesh.Trimesh, gt: trimesh.Trimesh, gt_sdf: Optional[Callable] = None) -> float:
    """Volumetric IoU of ``pred`` against ``gt`` (its ``gt_sdf`` when known) on cells fixed by ``gt``."""
    union = (np.minimum(pred.bounds[0], gt.bounds[0]), np.maximum(pred.bounds[1], gt.bounds[1]))
    bounds, cells = reference_lattice(gt.bounds, union, IOU_RESOLUTION)
    return volumetric_iou(pred, gt_sdf if gt_sdf is not None else gt, resolution=cells, bounds=bounds)


def shape_and_colour_scores(
    pred: trimesh.Trimesh, gt: trimesh.Trimesh, gt_sdf: Optional[Callable] = None, gt_albedo: Optional[Callable] = None
) -> Dict[str, float]:
    """Volumetric IoU (on cells fixed by the ground truth), Chamfer-L1 and colour delta-E of ``pred``
    against a ground-truth mesh.

    ``gt_sdf`` / ``gt_albedo`` (functions of points), when known, replace the mesh's inside test and
    its vertex colours.
    """
    return {
        "iou": iou_on_reference_lattice(pred, gt, gt_sdf),
        "chamfer_l1": chamfer_l1(pred, gt),
        "delta_e": surface_colour_error(pred, gt_albedo, gt_geometry=gt) if gt_albedo is not None else surface_colour_error(pred, gt),
    }


def mesh_metrics(pred: trimesh.Trimesh, caption: str) -> Dict[str, Any]:
    """All metrics of one exported mesh against the ground truth of ``caption``."""
    from threestudio_mv.data.procedural import asset_mesh, parse_caption

    asset = parse_caption(caption)
    gt = asset_mesh(asset)
    return {**shape_and_colour_scores(pred, gt, asset.sdf, asset.albedo), "front": front_score(pred, gt), **mesh_quality(pred)}


def latest_export(trial: Path) -> Path:
    """The newest export of a trial (of its last stage, for a staged trial)."""
    exports = sorted(trial.glob("**/save/it*-export"), key=lambda p: (p / "model.obj").stat().st_mtime if (p / "model.obj").exists() else 0)
    if not exports:
        raise RuntimeError(f"no export in {trial}")
    return exports[-1]


def trial_path(config: Path, caption: str, out: Path) -> Path:
    return out / f"eval-{config.stem}" / caption.replace(" ", "_")


def run_one(config: Path, caption: str, out: Path, overrides: List[str], threads: int, reuse: bool) -> Dict[str, Any]:
    trial = trial_path(config, caption, out)
    name, tag = trial.parent.name, trial.name
    if reuse and list(trial.glob("**/save/it*-export/model.obj")):
        seconds = json.loads((trial / "eval_seconds.json").read_text())["seconds"] if (trial / "eval_seconds.json").is_file() else None
        metrics = mesh_metrics(mesh_from_export(latest_export(trial)), caption)
        return {"caption": caption, "config": config.stem, "seconds": seconds, "trial": str(trial), **metrics}
    arguments = [
        "--config", str(config), "--train", "--export", "--test",
        f"system.prompt_processor.prompt={caption}", f"name={name}", f"tag={tag}", "use_timestamp=false",
        f"exp_root_dir={out}", "trainer.enable_progress_bar=false", *overrides,
    ]
    if reuse and list(trial.glob("*/ckpts/last.ckpt")):  # a staged trial with finished stages: only the rest runs
        arguments.append(f"resume={trial}")
    env = thread_env(threads)
    start = time.time()
    run = run_trial(arguments, env=env)
    seconds = time.time() - start
    if run.returncode != 0 or run.export_dir is None:
        return {"caption": caption, "config": config.stem, "error": run.stderr.strip().splitlines()[-1:], "seconds": seconds}
    save_json(trial / "eval_seconds.json", {"seconds": seconds, "threads": threads})
    metrics = mesh_metrics(mesh_from_export(run.export_dir), caption)
    return {"caption": caption, "config": config.stem, "seconds": seconds, "trial": str(trial), **metrics}


def pick_captions(split: str, num: int) -> List[str]:
    """``num`` captions spread evenly over the split's vocabulary (primitives and composites)."""
    from threestudio_mv.data.procedural import vocabulary

    captions = vocabulary(split)
    if num >= len(captions):
        return captions
    return [captions[int(i)] for i in np.linspace(0, len(captions) - 1, num).round()]


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    summary: Dict[str, Any] = {}
    for config in sorted({row["config"] for row in rows}):
        done = [row for row in rows if row["config"] == config and "error" not in row]
        fronts = [row["front"] for row in done if row["front"] is not None]
        summary[config] = {
            "runs": len(done),
            "failed": sum(1 for row in rows if row["config"] == config and "error" in row),
            "mean_iou": float(np.mean([r["iou"] for r in done])) if done else None,
            "mean_chamfer_l1": float(np.mean([r["chamfer_l1"] for r in done])) if done else None,
            "mean_delta_e": float(np.mean([r["delta_e"] for r in done])) if done else None,
            "single_front": f"{sum(f > 0.5 for f in fronts)}/{len(fronts)}",
            "mean_seconds": float(np.mean(seconds)) if (seconds := [r["seconds"] for r in done if r["seconds"]]) else None,
            "min_largest_piece_area": float(min(r["largest_piece_area"] for r in done)) if done else None,
            "watertight": f"{sum(r['watertight'] for r in done)}/{len(done)}",
            "mean_normal_angle_deg": float(np.mean([r["mean_normal_angle_deg"] for r in done])) if done else None,
        }
    return summary


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    configs = sorted({row["config"] for row in rows})
    header = "| caption | " + " | ".join(f"{c}: IoU / CD / dE / front / piece / angle" for c in configs) + " |"
    lines = [header, "|---|" + "---|" * len(configs)]
    for caption in dict.fromkeys(row["caption"] for row in rows):
        cells = []
        for config in configs:
            row = next(r for r in rows if r["caption"] == caption and r["config"] == config)
            if "error" in row:
                cells.append("failed")
                continue
            front = "-" if row["front"] is None else f"{row['front']:.2f}"
            cells.append(f"{row['iou']:.2f} / {row['chamfer_l1']:.3f} / {row['delta_e']:.1f} / {front} / "
                         f"{row['largest_piece_area']:.3f} / {row['mean_normal_angle_deg']:.1f}")
        lines.append(f"| {caption} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def latest_test_frame(trial: Path) -> Optional[Path]:
    """The first turntable frame of a trial's newest test run (of its last stage), if any."""
    frames = sorted(Path(trial).glob("**/save/it*-test-000.png"), key=lambda p: p.stat().st_mtime)
    return frames[-1] if frames else None


def first_frames_sheet(rows: List[Dict[str, Any]], path: Path) -> Optional[Path]:
    """The first turntable frame of every finished run: one row per caption, one column per config."""
    from threestudio_mv.utils.io import image_grid, load_image, save_image

    configs = sorted({row["config"] for row in rows})
    grid, blank = [], None
    for caption in dict.fromkeys(row["caption"] for row in rows):
        line = []
        for config in configs:
            row = next(r for r in rows if r["caption"] == caption and r["config"] == config)
            frame = latest_test_frame(row["trial"]) if "trial" in row else None
            line.append(load_image(frame)[..., :3] if frame else None)
            if frame:
                blank = np.ones_like(line[-1])
        grid.append(line)
    if blank is None:
        return None
    return save_image(path, image_grid([[image if image is not None else blank for image in line] for line in grid]))


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True, help="trial configs to compare")
    parser.add_argument("--split", default="heldout", choices=["train", "heldout", "all"])
    parser.add_argument("--num", type=int, default=10)
    parser.add_argument("--captions", nargs="*", help="explicit captions instead of --split/--num")
    parser.add_argument("--out", default="outputs/eval-text-to-3d")
    parser.add_argument("--jobs", type=int, default=1, help="trials run at once")
    parser.add_argument("--reuse", action="store_true", help="score trials that already have an export; resume staged trials after their finished stages")
    args, overrides = parser.parse_known_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    from threestudio_mv.launch import find_config

    configs = [find_config(c).resolve() for c in args.configs]
    captions = args.captions or pick_captions(args.split, args.num)
    out = Path(args.out).resolve()
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    jobs = [(caption, config) for caption in captions for config in configs]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    rows: List[Dict[str, Any]] = []
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on launch.py subprocesses
        futures = [pool.submit(run_one, config, caption, out, overrides, threads, args.reuse) for caption, config in jobs]
        for future in tqdm(futures, desc="text-to-3D runs", total=len(jobs)):
            rows.append(future.result())
            save_json(out / "results.json", {"rows": rows, "summary": summarise(rows)})
    (out / "table.md").write_text(markdown_table(rows))
    first_frames_sheet(rows, out / "first_frames.png")
    print(json.dumps(summarise(rows), indent=2))


if __name__ == "__main__":
    main()
