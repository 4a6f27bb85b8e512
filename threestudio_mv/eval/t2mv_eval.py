"""Evaluate the multi-view diffusion model against the procedural ground truth.

    python -m threestudio_mv.eval.t2mv_eval [--model DIR] [--num-heldout 40] [--num-train 40]
        [--elevation 15] [--steps N] [--guidance G] [--eta E] --out results.json [--grid docs/t2mv_grid.png]

For each caption (held-out ones from ``vocabulary("heldout")`` and training ones), 4 views are
generated at one elevation and rendered from the true asset at the same cameras. Metrics:

- ``silhouette_iou``: IoU of the generated foreground (pixels that differ from the white background
  by more than 0.1 in some channel) with the true silhouette (alpha > 0.5), mean over views.
- ``silhouette_iou_estimated_bg``: the same, with the background colour estimated per view (median
  of the border pixels) and the mask cleaned by a 3x3 median filter: a model whose background is
  tinted or speckled, not pure white, still gets its object's silhouette scored. The colour and
  consistency figures use these masks.
- ``colour_accuracy``: fraction of captions whose generated dominant colour (the most frequent
  nearest named colour over the foreground pixels of the 4 views; lightness discounted, so shading
  does not change the name) is the asset's dominant colour. ``gt_colour_accuracy`` is the same
  measure on the true renders (the ceiling this measure allows).
- ``consistency_iou`` (multi-view consistency): carve the visual hull of the 4 generated silhouettes
  (a voxel is kept if it projects inside every silhouette), reproject it into each view and take its
  IoU with that view's silhouette. Views of one consistent object give ~1 (the hull reproduces every
  silhouette); views that disagree carve each other away. ``gt_consistency_iou`` is the same on the
  true renders (below 1 only from voxel and pixel discretisation).
- ``camera_reliance`` (does the model use its cameras?): the true renders are noised at t = 500,
  800 and 950 with seeded noise, and the model's noise-prediction error with the views' cameras
  turned half a turn (each view given the camera of the view opposite) is compared with the error
  with the true cameras: ``error_turned / error_true - 1``. A model that ignores its cameras scores
  ~0 on every caption; one that knows which side it sees scores well above 0 on objects with a
  front and back (a car, a duck) and ~0 on round ones. Reported per caption and as the mean.

Writes a JSON summary (per split) with per-caption rows, and optionally a PNG: rows of prompts,
generated views on the left, true renders on the right.
"""
import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from threestudio_mv.eval.metrics import foreground_mask, silhouette_iou
from threestudio_mv.t2mv import check_eta
from threestudio_mv.utils.camera import project_points
from threestudio_mv.utils.errors import UserError, exit_on_user_error
from threestudio_mv.utils.io import image_grid, save_image, save_json

FOREGROUND_THRESHOLD = 0.1
HULL_RESOLUTION = 64
HULL_HALF_EXTENT = 0.6  # assets lie in [-0.5, 0.5]^3


def spread_captions(captions: Sequence[str], count: int) -> List[str]:
    """``count`` captions evenly spread over the list (so every kind of asset is represented)."""
    if count >= len(captions):
        return list(captions)
    indices = np.linspace(0, len(captions) - 1, count).round().astype(int)
    return [captions[i] for i in indices]


def dominant_colour_name(images: np.ndarray, masks: np.ndarray) -> Optional[str]:
    """The most frequent nearest named colour over the foreground pixels (None: no foreground)."""
    from skimage.color import rgb2lab

    from threestudio_mv.data.procedural.colours import COLOUR_NAMES, colour_lab

    pixels = images[masks].astype(np.float64) / 255.0
    if len(pixels) == 0:
        return None
    lab = rgb2lab(pixels.reshape(1, -1, 3))[0]
    weights = np.array([0.5, 1.0, 1.0])
    distances = np.linalg.norm((lab[:, None, :] - colour_lab()[None]) * weights, axis=-1)
    counts = np.bincount(distances.argmin(axis=1), minlength=len(COLOUR_NAMES))
    return COLOUR_NAMES[int(counts.argmax())]


def visual_hull_consistency(masks: np.ndarray, c2w: torch.Tensor, fovy: torch.Tensor) -> float:
    """Mean IoU between each silhouette and the reprojection of the views' joint visual hull."""
    views, height, width = masks.shape
    axis = torch.linspace(-HULL_HALF_EXTENT, HULL_HALF_EXTENT, HULL_RESOLUTION)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    pixels = []
    for view in range(views):
        projected = project_points(points, c2w[view], fovy[view], height, width)
        cols = projected[:, 0].floor().long().clamp(0, width - 1)
        rows = projected[:, 1].floor().long().clamp(0, height - 1)
        inside = (projected[:, 0] >= 0) & (projected[:, 0] < width) & (projected[:, 1] >= 0) & (projected[:, 1] < height)
        pixels.append((rows, cols, inside))
    keep = torch.ones(points.shape[0], dtype=torch.bool)
    for view, (rows, cols, inside) in enumerate(pixels):
        keep &= inside & torch.from_numpy(masks[view])[rows, cols]
    scores = []
    for view, (rows, cols, _) in enumerate(pixels):
        hull = np.zeros((height, width), dtype=bool)
        hull[rows[keep].numpy(), cols[keep].numpy()] = True
        scores.append(silhouette_iou(hull, masks[view]))
    return float(np.mean(scores))


RELIANCE_TIMESTEPS = (500, 800, 950)


@torch.no_grad()
def camera_reliance(
    model, text_embeddings: torch.Tensor, images: torch.Tensor, c2w: torch.Tensor, seed: int = 0, draws: int = 2
) -> float:
    """Relative increase of the noise-prediction error on ``images`` (V, 3, H, W) in [0, 1] of one object
    when each view gets the camera of the view opposite instead of its own (see the module docstring).

    ``text_embeddings`` (1, L, D) of the object's caption; ``c2w`` (V, 4, 4), V even, evenly spaced.
    """
    from threestudio_mv.utils.camera import mvdream_camera_condition

    views = images.shape[0]
    if views % 2:
        raise ValueError(f"camera_reliance needs an even number of views, got {views}")
    device = model.device
    clean = model.encode_images(images.to(device) * 2.0 - 1.0)
    camera = mvdream_camera_condition(c2w).to(device)
    turned = camera.roll(views // 2, dims=0)
    embeddings = text_embeddings.to(device).expand(views, -1, -1)
    scheduler = model.noise_scheduler()
    generator = torch.Generator().manual_seed(seed)
    error_true = error_turned = 0.0
    for timestep in RELIANCE_TIMESTEPS:
        timesteps = torch.full((views,), timestep, device=device)
        for _ in range(draws):
            noise = torch.randn(clean.shape, generator=generator).to(device)
            noisy = scheduler.add_noise(clean, noise, timesteps)
            error_true += torch.mean((model.predict_noise(noisy, timesteps, embeddings, camera, views) - noise) ** 2).item()
            error_turned += torch.mean((model.predict_noise(noisy, timesteps, embeddings, turned, views) - noise) ** 2).item()
    return error_turned / error_true - 1.0


def evaluate_captions(
    model, encode, captions: List[str], elevation: float, steps: Optional[int], guidance: Optional[float],
    seed: int, batch: int, progress: bool = True, anchor: bool = True, eta: Optional[float] = None,
) -> Dict[str, object]:
    """Generate, render the truth and score ``captions``; returns rows and the mean metrics."""
    from threestudio_mv.data.procedural import parse_caption, render_views
    from threestudio_mv.t2mv import text_to_multiview

    suffix = model.metadata.prompt_suffix
    uncond = encode([""])
    rows: List[Dict[str, object]] = []
    starts = range(0, len(captions), batch)
    for start in tqdm(starts, total=len(starts), desc="captions", unit="batch", disable=not progress):
        chunk = captions[start : start + batch]
        cond = encode([c + suffix for c in chunk])
        result = text_to_multiview(
            model, cond, uncond, elevation=elevation, num_inference_steps=steps,
            guidance_scale=guidance, seed=seed + start, progress=False, anchor=anchor, eta=eta,
        )
        c2w, fovy = torch.from_numpy(result["c2w"]), torch.from_numpy(result["fovy"])
        for index, (caption, generated) in enumerate(zip(chunk, result["images"])):
            asset = parse_caption(caption)
            truth = render_views(asset, c2w, fovy, size=generated.shape[1])
            reliance = camera_reliance(model, cond[index : index + 1], truth["rgb"].permute(0, 3, 1, 2), c2w, seed)
            true_rgb = (truth["rgb"].numpy() * 255.0 + 0.5).astype(np.uint8)
            true_masks = truth["alpha"].numpy() > 0.5
            white_masks = np.stack([foreground_mask(view / 255.0, threshold=FOREGROUND_THRESHOLD) for view in generated])
            masks = np.stack([foreground_mask(view / 255.0, None, FOREGROUND_THRESHOLD, despeckle=True) for view in generated])
            rows.append({
                "caption": caption,
                "silhouette_iou": float(np.mean([silhouette_iou(m, t) for m, t in zip(white_masks, true_masks)])),
                "silhouette_iou_estimated_bg": float(np.mean([silhouette_iou(m, t) for m, t in zip(masks, true_masks)])),
                "colour": dominant_colour_name(generated, masks),
                "gt_colour": dominant_colour_name(true_rgb, true_masks),
                "true_colour": asset.dominant_colour,
                "consistency_iou": visual_hull_consistency(masks, c2w, fovy),
                "gt_consistency_iou": visual_hull_consistency(true_masks, c2w, fovy),
                "camera_reliance": reliance,
                "images": generated,
                "truth": true_rgb,
            })
    summary = {
        "num_captions": len(rows),
        "silhouette_iou": float(np.mean([r["silhouette_iou"] for r in rows])),
        "silhouette_iou_estimated_bg": float(np.mean([r["silhouette_iou_estimated_bg"] for r in rows])),
        "colour_accuracy": float(np.mean([r["colour"] == r["true_colour"] for r in rows])),
        "gt_colour_accuracy": float(np.mean([r["gt_colour"] == r["true_colour"] for r in rows])),
        "consistency_iou": float(np.mean([r["consistency_iou"] for r in rows])),
        "gt_consistency_iou": float(np.mean([r["gt_consistency_iou"] for r in rows])),
        "camera_reliance": float(np.mean([r["camera_reliance"] for r in rows])),
    }
    return {"summary": summary, "rows": rows}


def grid_rows(rows: List[Dict[str, object]], scale: int = 3) -> np.ndarray:
    """A PNG grid: one row per caption, generated views then true renders, upscaled ``scale`` x."""
    lines = []
    for row in rows:
        views = list(row["images"]) + list(row["truth"])
        lines.append([np.repeat(np.repeat(view, scale, axis=0), scale, axis=1) for view in views])
    return image_grid(lines, pad=4)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled mvdream-tiny)")
    parser.add_argument("--num-heldout", type=int, default=40)
    parser.add_argument("--num-train", type=int, default=40)
    parser.add_argument("--elevation", type=float, default=15.0)
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta in [0, 1] (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8, help="captions per sampler call")
    parser.add_argument("--cache-dir", default=None, help="text embedding cache folder")
    parser.add_argument("--no-anchor", action="store_true", help="sample without the background anchor")
    parser.add_argument("--out", required=True, help="JSON results")
    parser.add_argument("--grid", default=None, help="PNG of --grid-prompts prompts (generated | truth)")
    parser.add_argument("--grid-prompts", type=int, default=12)
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    from threestudio_mv.data.procedural import vocabulary
    from threestudio_mv.models.mvdiffusion.model import MultiViewDiffusionModel
    from threestudio_mv.models.prompt_processors.cache import CachedTextEncoder

    args = parse_args(argv)
    if args.num_heldout < 0 or args.num_train < 0 or args.num_heldout + args.num_train == 0:
        raise UserError("--num-heldout and --num-train must be >= 0 and not both 0")
    if not args.out.endswith(".json"):
        raise UserError(f"--out '{args.out}' must end in .json")
    check_eta(args.eta)
    model = MultiViewDiffusionModel.from_pretrained(args.model)
    encoder = model.build_text_encoder()
    if encoder.trainable:
        encode = lambda texts: encoder.encode(texts).detach()  # noqa: E731
    else:
        cache = CachedTextEncoder(encoder, Path(args.cache_dir).expanduser() if args.cache_dir else None)
        encode = cache.encode
    splits = {"heldout": spread_captions(vocabulary("heldout"), args.num_heldout),
              "train": spread_captions(vocabulary("train"), args.num_train)}
    results: Dict[str, object] = {
        "model": str(args.model or "bundled"),
        "settings": {"elevation": args.elevation, "steps": args.steps or model.metadata.num_inference_steps,
                     "guidance": args.guidance or model.metadata.guidance_scale, "seed": args.seed,
                     "eta": model.metadata.eta if args.eta is None else args.eta,
                     "fovy": model.metadata.default_fovy, "foreground_threshold": FOREGROUND_THRESHOLD,
                     "background_anchor": None if args.no_anchor else model.metadata.background},
    }
    all_rows: Dict[str, list] = {}
    with torch.no_grad():
        for split, captions in splits.items():
            if not captions:
                continue
            scored = evaluate_captions(model, encode, captions, args.elevation, args.steps, args.guidance, args.seed,
                                       args.batch, anchor=not args.no_anchor, eta=args.eta)
            all_rows[split] = scored["rows"]
            results[split] = {
                **scored["summary"],
                "rows": [{k: v for k, v in row.items() if k not in ("images", "truth")} for row in scored["rows"]],
            }
            print(split, {k: round(v, 3) if isinstance(v, float) else v for k, v in scored["summary"].items()})
    save_json(args.out, results)
    if args.grid:
        half = args.grid_prompts // 2
        picked = all_rows.get("heldout", [])[:: max(1, len(all_rows.get("heldout", [])) // max(half, 1))][:half]
        rest = args.grid_prompts - len(picked)
        train_rows = all_rows.get("train", [])
        picked += train_rows[:: max(1, len(train_rows) // max(rest, 1))][:rest]
        save_image(args.grid, grid_rows(picked))
        save_json(Path(args.grid).with_suffix(".json"), {"rows_top_to_bottom": [r["caption"] for r in picked],
                                                         "columns": "4 generated views | 4 true renders, azimuth 0/90/180/270"})
    return results


if __name__ == "__main__":
    main()
