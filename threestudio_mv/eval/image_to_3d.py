"""Evaluate image-to-3D (the image-to-views model + reconstruction) on held-out procedural assets and
on outside meshes, against two baselines, in one run.

    python -m threestudio_mv.eval.image_to_3d [--model DIR] [--assets 3] [--inputs 1 2 4]
        [--baseline-inputs 1 2 4] [--meshes teddy:brown blub:orange] [--out DIR] [--jobs 2]
        [--sampling-arm guidance_scale=2 ...]

Per object (a held-out caption, or an outside mesh coloured with a named colour), 4 input images at
random poses over the training ranges (the first at a random azimuth), rendered at 64 px and written
as RGBA PNGs. For each input count K:

- **ours**: ``launch.py --config configs/image-to-3d.yaml --train --export data.image_path=<K inputs>``,
  the one command a user runs, timed (seconds from image to mesh). Its 16 generated views are scored
  against true renders at the same cameras (PSNR, SSIM, silhouette IoU, colour delta-E over pixels
  both call foreground); its mesh, turned from the input's frame into the world by the first input's
  true azimuth, against the true shape (volumetric IoU, Chamfer-L1, surface colour delta-E).
- **no global attention** (K = 1 only): the same model with per-view attention; views scored alike.
- **no colour match** (K = 1 only, when the model matches its views to the inputs' colours): the
  model's own colours; views scored alike.
- **sampling KEY=VALUE,...** (K = 1 only, one per ``--sampling-arm``): the same model sampled with other
  settings (``guidance_scale``, ``num_inference_steps``, ``eta``), e.g. the settings before a change of
  the folder's defaults: the same run's baseline for that change; views scored alike.
- **posed inputs** (the ``--baseline-inputs`` counts): ``configs/reconstruction.yaml`` fitted to the
  K inputs alone at their TRUE cameras (which this method never gets), with the same fitting settings
  (steps, rays, size); mesh scored alike.

Writes ``results.json`` (rows + summary) and ``sheet.png`` (per object and K: inputs | 8 generated
views at elevation 0 | the true views), and prints the summary as JSON.
"""
import argparse
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from threestudio_mv.data.foreground import load_object_image
from threestudio_mv.data.posed_images import load_posed_images
from threestudio_mv.eval.metrics import mesh_from_export
from threestudio_mv.models.mvdiffusion.image_to_views import (
    ImageToViewsMetadata,
    ImageToViewsModel,
    generate_views,
    random_input_cameras,
    target_cameras,
    rgba_view_scores,
)
from threestudio_mv.eval.subjects import MESH_DIR, Subject, mesh_subject, procedural_subject, straight_alpha, subject_scores, turned
from threestudio_mv.utils.camera import CameraLight
from threestudio_mv.utils.errors import UserError, exit_on_user_error
from threestudio_mv.utils.io import image_grid, save_image, save_json
from threestudio_mv.utils.trial import run_trial, thread_env

INPUT_SIZE = 64
SAMPLING_KEYS = {"guidance_scale": float, "num_inference_steps": int, "eta": float}
# The fitting settings of configs/image-to-3d.yaml, given to the posed-inputs baseline too.
FIT_OVERRIDES = ["data.rays_per_batch=2048", "system.exporter.texture_size=512"]


def write_posed_inputs(folder: Path, images: torch.Tensor, cameras: Dict[str, torch.Tensor]) -> Path:
    """Input renders as RGBA PNGs + a transforms.json with their TRUE cameras (the baseline's data)."""
    light = CameraLight()
    frames = []
    for i, image in enumerate(images):
        save_image(folder / f"input_{i}.png", straight_alpha(image))
        frames.append({"file_path": f"input_{i}.png", "transform_matrix": cameras["c2w"][i].tolist()})
    fovy = float(cameras["fovy"][0])
    save_json(folder / "transforms.json", {
        "camera_angle_x": math.radians(fovy), "frames": frames,
        "light": {"direction_camera": list(light.direction_camera), "ambient_ratio": light.ambient_ratio},
    })
    return folder


def fit(arguments: List[str], threads: int) -> Dict[str, Any]:
    """Run one CLI trial; seconds and the export folder (or the error)."""
    env = thread_env(threads)
    start = time.time()
    run = run_trial(arguments, env=env)
    seconds = time.time() - start
    if run.returncode != 0 or run.export_dir is None:
        return {"seconds": seconds, "error": " ".join(run.stderr.strip().splitlines()[-1:])}
    return {"seconds": seconds, "export": run.export_dir}


def evaluate_subject(
    subject: Subject, kind: str, index: int, model: ImageToViewsModel, model_dir: Optional[str], args: argparse.Namespace
) -> Dict[str, Any]:
    """All rows of one subject, and its sheet rows."""
    meta: ImageToViewsMetadata = model.metadata
    generator = torch.Generator().manual_seed(args.seed * 1000 + index)
    # One FOV per subject: the posed baseline's transforms.json has one camera_angle_x.
    cameras = random_input_cameras(max(args.inputs + args.baseline_inputs), generator, one_fovy=True)
    azimuth0 = float(cameras["azimuth"][0])
    renders = subject.render(cameras["c2w"], cameras["fovy"], INPUT_SIZE)
    root = Path(args.out) / f"{kind}-{index}"
    truth_cams = target_cameras(meta, azimuth0)
    truth = subject.render(truth_cams["c2w"], truth_cams["fovy"], meta.image_size)
    back = torch.tensor(meta.background)
    over = lambda rgba: rgba[..., :3] + back * (1.0 - rgba[..., 3:])  # noqa: E731
    common = [f"exp_root_dir={root}", "use_timestamp=false", "trainer.enable_progress_bar=false",
              f"trainer.max_steps={args.fit_steps}", f"trainer.val_check_interval={args.fit_steps}"]
    rows, sheet = [], []
    jobs = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for count in sorted(set(args.inputs)):
            folder = root / f"inputs-{count}"
            for i in range(count):
                save_image(folder / f"input_{i}.png", straight_alpha(renders[i]))
            views_dir = root / f"views-{count}"
            overrides = [f"data.image_path={folder}", f"data.views_dir={views_dir}", *common, "name=ours", f"tag=k{count}"]
            if model_dir:
                overrides.append(f"data.model={model_dir}")
            jobs.append(("ours", count, views_dir, pool.submit(fit, ["--config", "image-to-3d", "--train", "--export", *overrides], args.threads)))
        for count in sorted(set(args.baseline_inputs)):
            folder = write_posed_inputs(root / f"posed-{count}", renders[:count], {k: v[:count] for k, v in cameras.items()})
            overrides = [f"data.root={folder}", *common, "name=posed", f"tag=k{count}", f"data.batch_size={min(count, 4)}", *FIT_OVERRIDES]
            jobs.append(("posed inputs", count, None, pool.submit(fit, ["--config", "reconstruction", "--train", "--export", *overrides], args.threads)))
        for method, count, views_dir, future in jobs:
            result = future.result()
            row: Dict[str, Any] = {"subject": subject.name, "kind": kind, "method": method, "inputs": count,
                                   "seconds": round(result["seconds"], 1)}
            if "error" in result:
                rows.append({**row, "error": result["error"]})
                continue
            mesh = mesh_from_export(result["export"])
            if method == "ours":
                mesh = turned(mesh, azimuth0)
                generated = load_posed_images(views_dir, meta.image_size, meta.image_size, tuple(meta.background))
                views = torch.cat([generated.rgb, generated.mask], dim=-1).permute(0, 3, 1, 2)
                row.update({f"views_{k}": v for k, v in rgba_view_scores(views, truth, meta.background).items()})
                inputs = [over(load_object_image(views_dir.parent / f"inputs-{count}" / f"input_{i}.png", meta.image_size, meta.object_fraction)) for i in range(count)]
                blank = torch.ones_like(inputs[0])
                sheet.append(inputs + [blank] * (4 - count) + [generated.rgb[i] for i in range(meta.target_azimuths)])
                if count == 1:
                    sheet.append([blank] * 4 + [over(t) for t in truth[: meta.target_azimuths]])
            scores = subject_scores(mesh, subject)
            rows.append({**row, **{f"mesh_{k}": round(float(scores[k]), 4) for k in ("iou", "chamfer_l1", "delta_e")}})
    # The views-only arms, one input each: the model sampled another way, scored like ours.
    first = load_object_image(root / "inputs-1" / "input_0.png", meta.image_size, meta.object_fraction)[None]

    def views_arm(method: str, **sampling: Any) -> Tensor:
        views = generate_views(model, first, args.seed, **sampling)
        rows.append({"subject": subject.name, "kind": kind, "method": method, "inputs": 1,
                     **{f"views_{k}": v for k, v in rgba_view_scores(views, truth, meta.background).items()}})
        return views

    # The ablation: global attention off (the targets see neither the inputs nor each other).
    ablated = views_arm("no global attention", global_attention=False)
    sheet.append([torch.ones_like(over(first[0]))] * 4 + [v[:3].permute(1, 2, 0) for v in ablated[: meta.target_azimuths]])
    if meta.match_input_colours:  # the model's own colours: the views before they are matched to the input's palette
        views_arm("no colour match", match_colours=False)
    for spec in args.sampling_arm:
        views_arm(f"sampling {spec}", **parse_sampling(spec))
    return {"rows": rows, "sheet": sheet}


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean of every metric per (kind, method, inputs)."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(f"{row['kind']} | {row['method']} | {row['inputs']}", []).append(row)
    summary = {}
    for key, members in groups.items():
        metrics = sorted({k for r in members for k in r if k.startswith(("views_", "mesh_")) or k == "seconds"})
        summary[key] = {m: round(float(np.nanmean([r[m] for r in members if m in r])), 4) for m in metrics if any(m in r for r in members)}
        summary[key]["n"] = len(members)
        errors = [r["error"] for r in members if "error" in r]
        if errors:
            summary[key]["errors"] = errors
    return summary


def parse_sampling(spec: str) -> Dict[str, Any]:
    """``"guidance_scale=2,eta=0.5"`` -> ``{"guidance_scale": 2.0, "eta": 0.5}`` (keyword arguments of
    :func:`generate_views`); a UserError naming a bad key or value."""
    settings: Dict[str, Any] = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in SAMPLING_KEYS:
            raise UserError(f"--sampling-arm '{spec}': unknown setting '{key}'; use {', '.join(SAMPLING_KEYS)} as KEY=VALUE")
        try:
            settings[key] = SAMPLING_KEYS[key](value)
        except ValueError:
            raise UserError(f"--sampling-arm '{spec}': '{key}' needs a {SAMPLING_KEYS[key].__name__}, got '{value}'") from None
    return settings


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m threestudio_mv.eval.image_to_3d", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="image-to-views model folder (default: the bundled i2mv-tiny)")
    parser.add_argument("--assets", type=int, default=3, help="held-out procedural assets")
    parser.add_argument("--inputs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--baseline-inputs", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--meshes", nargs="*", default=["teddy:brown", "blub:orange"], help="outside meshes as name:colour")
    parser.add_argument("--mesh-dir", type=Path, default=MESH_DIR, help="folder of the --meshes names")
    parser.add_argument("--mesh-inputs", type=int, nargs="+", default=[1], help="input counts for the outside meshes")
    parser.add_argument("--fit-steps", type=int, default=200, help="reconstruction steps (configs/image-to-3d.yaml's)")
    parser.add_argument("--out", default="outputs/eval/image-to-3d")
    parser.add_argument("--jobs", type=int, default=2, help="trials run at once")
    parser.add_argument("--threads", type=int, default=1, help="threads per trial")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampling-arm", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="an extra views-only arm with 1 input: the model sampled with these settings "
                        f"({', '.join(SAMPLING_KEYS)}), e.g. guidance_scale=2; repeatable")
    args = parser.parse_args(argv)
    for spec in args.sampling_arm:
        parse_sampling(spec)
    if 1 not in args.inputs:
        raise UserError("--inputs must include 1 (the ablation and the sheet use one input)")
    if max(args.inputs + args.baseline_inputs) > 4:
        raise UserError("input counts go up to 4")
    return args


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    from threestudio_mv.data.procedural.captions import vocabulary

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = ImageToViewsModel.from_pretrained(args.model)
    captions = vocabulary("heldout")
    picks = torch.randperm(len(captions), generator=torch.Generator().manual_seed(args.seed))[: args.assets].tolist()
    subjects = [("heldout", procedural_subject(captions[p])) for p in picks] + [("outside", mesh_subject(s, args.mesh_dir)) for s in args.meshes]
    rows: List[Dict[str, Any]] = []
    sheet: List[List[Any]] = []
    for index, (kind, subject) in enumerate(tqdm(subjects, desc="image-to-3D objects", unit="object")):
        run_args = args if kind == "heldout" else argparse.Namespace(**{**vars(args), "inputs": args.mesh_inputs, "baseline_inputs": args.mesh_inputs})
        result = evaluate_subject(subject, kind, index, model, args.model, run_args)
        rows.extend(result["rows"])
        sheet.extend(result["sheet"])
        save_json(Path(args.out) / "results.json", {"rows": rows, "summary": summarise(rows)})
        tqdm.write(f"{subject.name}: done")
    out = Path(args.out)
    save_image(out / "sheet.png", image_grid(sheet))
    summary = summarise(rows)
    save_json(out / "results.json", {"rows": rows, "summary": summary, "model": args.model or "bundled i2mv-tiny"})
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
