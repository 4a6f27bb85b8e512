"""Evaluate text-to-panorama with and without correspondence-aware attention, against ground truth.

    python -m threestudio_mv.eval.panorama [--model DIR] [--num-heldout 16] [--num-outpaint 8]
        [--prompts canonical|paraphrase] [--steps N] [--guidance G] [--eta E] [--seed 0] [--threads 2]
        --out docs/panorama_eval.json [--sheet docs/panorama_sheet.png]

Held-out room captions (:func:`threestudio_mv.data.procedural.rooms.room_keys` "heldout", spread over
the list) are each sampled four times from the same seed and the same base model (``ARMS``): the
default sampler (CAA blocks + overlap fusion of each step's x0), CAA alone, fusion alone, and neither
(the base model alone: 8 independent views). The true room (built from the caption's colours, seed =
caption index) rendered at the same 8 cameras (yaw 45 i) is the ceiling. Metrics:

- ``overlap_psnr``: view i warped into view i + 1 by the homography K R_{i+1}^-1 R_i K^-1 (bilinear),
  PSNR against view i + 1 on the pixels both see; mean over the 8 pairs and the captions.
- ``seam_error``: the views stitched into an equirectangular image with hard seams (each pixel from its
  nearest view): mean absolute RGB difference between the two columns either side of each of the 8
  seams, over the rows every view covers (latitude within +-40 degrees), in [0, 1] units.
- ``wall_colour_accuracy`` / ``floor_colour_accuracy`` / ``colour_accuracy`` (both right): the most
  frequent nearest named colour of the tent-blended panorama's wall band (latitude within +-8 degrees)
  and floor band (latitude -42 to -34 degrees) against the caption's colours.
- ``seconds_per_panorama`` (wall clock) and ``cpu_seconds_per_panorama`` (process CPU time), with
  ``--threads`` torch threads; the machine's load at the time is recorded.
- Outpainting (``--num-outpaint`` captions): the true view 0 is given with the caption;
  ``given_view_psnr`` is the output view 0 against it, ``given_overlap_psnr`` the overlap PSNR of the
  views 1 and 7 with the given view (does the panorama continue it across the seams?), against the
  same for text-only panoramas with CAA and for the truth.

Writes a JSON summary with per-caption rows and the floors of issue 19, and a contact sheet PNG
(the first ``--sheet-rows`` captions: truth | one panorama per arm in ``ARMS`` order, tent-blended; then as
many outpainting rows: given view | result).
"""
import argparse
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from threestudio_mv.data.procedural import rooms
from threestudio_mv.eval.t2mv_eval import dominant_colour_name, spread_captions
from threestudio_mv.t2mv import check_eta
from threestudio_mv.utils import camera
from threestudio_mv.utils.errors import UserError, exit_on_user_error
from threestudio_mv.utils.io import image_grid, save_image, save_json

#: arm -> (CAA blocks on, overlap fusion on); "caa_fused" is what ``python -m threestudio_mv.panorama`` does
ARMS = {"caa_fused": (True, True), "caa": (True, False), "no_caa_fused": (False, True), "no_caa": (False, False)}
WALL_BAND = (-8.0, 8.0)
FLOOR_BAND = (-42.0, -34.0)
SEAM_LATITUDE = 40.0
PSNR_CAP = 100.0


def psnr(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """PSNR (dB, images in [0, 1], capped at 100) of a against b over ``mask`` (broadcast) or all."""
    error = (a.float() - b.float()) ** 2
    if mask is not None:
        mask = mask.expand_as(error)
        mse = float(error[mask].mean()) if mask.any() else float("nan")
    else:
        mse = float(error.mean())
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else -10.0 * math.log10(mse)


def warp_into(source: torch.Tensor, yaw_source: float, yaw_target: float, fov_deg: float) -> Dict[str, torch.Tensor]:
    """View ``source`` (3, S, S) at ``yaw_source`` resampled into the view at ``yaw_target`` by the
    rotation homography: ``image`` (3, S, S) and ``valid`` (S, S), the target pixels the source sees."""
    size = source.shape[-1]
    K = camera.intrinsics_from_fov(fov_deg, size, size)
    c2w = camera.yaw_c2w(torch.tensor([yaw_target, yaw_source]))
    H = camera.rotation_homography(K, c2w[0], c2w[1])  # target pixels -> source pixels
    rows, cols = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    points, front = camera.apply_homography(H, torch.stack([cols, rows], dim=-1))
    # A source pixel centre lies in [0.5, S - 0.5]: keep targets that land inside (no extrapolation).
    valid = front & (points >= 0.5).all(-1) & (points <= size - 0.5).all(-1)
    grid = points / size * 2.0 - 1.0
    image = F.grid_sample(source[None].float(), grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0]
    return {"image": image, "valid": valid}


def overlap_psnr(views: torch.Tensor, yaws: torch.Tensor, fov_deg: float, pairs: Optional[Sequence[tuple]] = None) -> float:
    """Mean PSNR of view i warped into view j against view j, over ``pairs`` (default (i, i + 1) cyclic)."""
    n = views.shape[0]
    pairs = pairs if pairs is not None else [(i, (i + 1) % n) for i in range(n)]
    scores = []
    for i, j in pairs:
        warped = warp_into(views[i], float(yaws[i]), float(yaws[j]), fov_deg)
        scores.append(psnr(warped["image"], views[j], warped["valid"][None]))
    return float(np.mean(scores))


def seam_error(views: torch.Tensor, yaws: torch.Tensor, fov_deg: float, height: int = 64) -> float:
    """Mean |difference| across the hard seams of the nearest-view equirectangular stitch."""
    from threestudio_mv.models.mvdiffusion.panorama import stitch_equirect

    image = stitch_equirect(views, yaws, fov_deg, height, blend="nearest")["image"]
    width = 2 * height
    latitude = 90.0 - 180.0 * (torch.arange(height) + 0.5) / height
    rows = latitude.abs() <= SEAM_LATITUDE
    errors = []
    for yaw in yaws.tolist():
        seam = round(((180.0 - (yaw + 180.0 / views.shape[0])) % 360.0) / 360.0 * width) % width
        left, right = image[rows, (seam - 1) % width], image[rows, seam]
        errors.append(float((left - right).abs().mean()))
    return float(np.mean(errors))


def band_colour(panorama: torch.Tensor, band: Sequence[float]) -> Optional[str]:
    """Most frequent nearest named colour of the panorama (H, W, 3) rows with latitude in ``band``."""
    height = panorama.shape[0]
    latitude = 90.0 - 180.0 * (torch.arange(height) + 0.5) / height
    rows = ((latitude >= band[0]) & (latitude <= band[1])).numpy()
    uint8 = (panorama.numpy() * 255.0 + 0.5).astype(np.uint8)
    mask = np.zeros(uint8.shape[:2], dtype=bool)
    mask[rows] = True
    return dominant_colour_name(uint8, mask)


def panorama_metrics(views: torch.Tensor, yaws: torch.Tensor, fov_deg: float, key: rooms.RoomKey) -> Dict[str, object]:
    """All per-panorama metrics of views (V, 3, S, S) in [0, 1] for the room colours ``key``."""
    from threestudio_mv.models.mvdiffusion.panorama import stitch_equirect

    panorama = stitch_equirect(views, yaws, fov_deg)["image"]
    wall, floor = band_colour(panorama, WALL_BAND), band_colour(panorama, FLOOR_BAND)
    return {
        "overlap_psnr": overlap_psnr(views, yaws, fov_deg),
        "seam_error": seam_error(views, yaws, fov_deg),
        "wall": wall,
        "floor": floor,
        "wall_right": wall == key[0],
        "floor_right": floor == key[1],
        "panorama": panorama,
    }


def summarise(rows: List[Dict[str, object]]) -> Dict[str, float]:
    """Means over captions of the per-panorama metrics."""
    mean = lambda name: float(np.mean([row[name] for row in rows]))  # noqa: E731
    return {
        "overlap_psnr": mean("overlap_psnr"),
        "seam_error": mean("seam_error"),
        "wall_colour_accuracy": mean("wall_right"),
        "floor_colour_accuracy": mean("floor_right"),
        "colour_accuracy": float(np.mean([row["wall_right"] and row["floor_right"] for row in rows])),
    }


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m threestudio_mv.eval.panorama", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="panorama model folder (default: the bundled panorama-tiny)")
    parser.add_argument("--num-heldout", type=int, default=16)
    parser.add_argument("--num-outpaint", type=int, default=8)
    parser.add_argument("--prompts", choices=["canonical", "paraphrase"], default="canonical",
                        help="canonical captions, or the first paraphrase of each")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta in [0, 1] (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the time floor is for 2 CPU cores)")
    parser.add_argument("--cache-dir", default=None, help="text embedding cache folder")
    parser.add_argument("--out", required=True, help="JSON results")
    parser.add_argument("--sheet", default=None, help="contact sheet PNG")
    parser.add_argument("--sheet-rows", type=int, default=6, help="captions (and outpainting rows) on the sheet")
    return parser.parse_args(argv)


def _timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    from threestudio_mv.models.mvdiffusion.panorama import PanoramaModel, sample_panorama
    from threestudio_mv.models.prompt_processors.cache import CachedTextEncoder

    args = parse_args(argv)
    if args.num_heldout < 1 or args.num_outpaint < 0:
        raise UserError("--num-heldout must be >= 1 and --num-outpaint >= 0")
    torch.set_num_threads(args.threads)
    model = PanoramaModel.from_pretrained(args.model)
    meta = model.metadata
    texts = CachedTextEncoder(model.build_text_encoder(), Path(args.cache_dir) if args.cache_dir else None)
    uncond = texts.encode([""])
    keys = spread_captions(list(rooms.room_keys("heldout")), args.num_heldout)
    yaws = camera.panorama_yaws(meta.n_view)
    check_eta(args.eta)
    options = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "eta": args.eta}
    results: Dict[str, List[Dict[str, object]]] = {name: [] for name in (*ARMS, "truth", "outpaint")}
    times: Dict[str, List[float]] = {f"{name}_{clock}": [] for name in ARMS for clock in ("wall", "cpu")}
    sheet_rows, outpaint_rows = [], []
    for index, key in enumerate(keys):
        prompt = rooms.room_caption(key) if args.prompts == "canonical" else rooms.room_paraphrases(key)[0]
        cond = texts.encode([prompt])
        truth = rooms.render_views(rooms.build_room(key, index), yaws, meta.image_size)["images"].permute(0, 3, 1, 2)
        row_images = []
        for name, views in (("truth", truth),):
            metrics = panorama_metrics(views, yaws, meta.fov_deg, key)
            row_images.append(metrics.pop("panorama"))
            results[name].append({"prompt": prompt, **metrics})
        for name, (use_caa, fuse) in ARMS.items():
            generator = torch.Generator().manual_seed(args.seed + index)
            views, wall, cpu = _timed(sample_panorama, model, cond, uncond, use_caa=use_caa, fuse_overlaps=fuse, generator=generator, **options)
            times[f"{name}_wall"].append(wall)
            times[f"{name}_cpu"].append(cpu)
            metrics = panorama_metrics(views, yaws, meta.fov_deg, key)
            row_images.append(metrics.pop("panorama"))
            results[name].append({"prompt": prompt, "seconds": wall, **metrics})
        sheet_rows.append(row_images)
        psnrs = " ".join(f"{name} {results[name][-1]['overlap_psnr']:.2f}" for name in (*ARMS, "truth"))
        print(f"[{index + 1}/{len(keys)}] {prompt}: overlap PSNR {psnrs}", flush=True)
    for index, key in enumerate(keys[: args.num_outpaint]):
        prompt = rooms.room_caption(key)
        truth = rooms.render_views(rooms.build_room(key, index), yaws, meta.image_size)["images"].permute(0, 3, 1, 2)
        given = truth[:1]
        views = sample_panorama(model, texts.encode([prompt]), uncond, given_view=given,
                                generator=torch.Generator().manual_seed(args.seed + index), **options)
        neighbours = [(0, 1), (0, meta.n_view - 1)]
        metrics = panorama_metrics(views, yaws, meta.fov_deg, key)
        outpaint_rows.append([given.permute(0, 2, 3, 1)[0], metrics.pop("panorama")])
        results["outpaint"].append({
            "prompt": prompt,
            "given_view_psnr": psnr(views[0], given[0]),
            "given_overlap_psnr": overlap_psnr(views, yaws, meta.fov_deg, neighbours),
            "truth_given_overlap_psnr": overlap_psnr(truth, yaws, meta.fov_deg, neighbours),
            **metrics,
        })
    summary = {name: summarise(rows) for name, rows in results.items() if rows and name != "outpaint"}
    for name in ARMS:
        summary[name]["seconds_per_panorama"] = float(np.mean(times[f"{name}_wall"]))
        summary[name]["cpu_seconds_per_panorama"] = float(np.mean(times[f"{name}_cpu"]))
    if results["outpaint"]:
        summary["outpaint"] = {
            "given_view_psnr": float(np.mean([r["given_view_psnr"] for r in results["outpaint"]])),
            "given_overlap_psnr": float(np.mean([r["given_overlap_psnr"] for r in results["outpaint"]])),
            "truth_given_overlap_psnr": float(np.mean([r["truth_given_overlap_psnr"] for r in results["outpaint"]])),
            **summarise(results["outpaint"]),
        }
    default, base, truth = summary["caa_fused"], summary["no_caa"], summary["truth"]
    summary["gains_db"] = {  # what each mechanism adds to the overlap PSNR
        "caa_without_fusion": summary["caa"]["overlap_psnr"] - base["overlap_psnr"],
        "caa_with_fusion": default["overlap_psnr"] - summary["no_caa_fused"]["overlap_psnr"],
        "fusion_with_caa": default["overlap_psnr"] - summary["caa"]["overlap_psnr"],
        "default_over_base_alone": default["overlap_psnr"] - base["overlap_psnr"],
    }
    floors = {
        "overlap_psnr_default_ge_base_alone_plus_3db": default["overlap_psnr"] >= base["overlap_psnr"] + 3.0,
        "overlap_psnr_default_within_3db_of_truth": default["overlap_psnr"] >= truth["overlap_psnr"] - 3.0,
        "colours_right_ge_80pct": default["colour_accuracy"] >= 0.8,
        "seconds_per_panorama_le_30": default["seconds_per_panorama"] <= 30.0,
    }
    if results["outpaint"]:
        floors["outpaint_given_view_psnr_ge_30db"] = summary["outpaint"]["given_view_psnr"] >= 30.0
    report = {
        "model": str(args.model or "bundled panorama-tiny"),
        "prompts": args.prompts,
        "num_heldout": len(keys),
        "steps": args.steps or meta.num_inference_steps,
        "guidance": args.guidance if args.guidance is not None else meta.guidance_scale,
        "eta": args.eta if args.eta is not None else meta.eta,
        "threads": args.threads,
        "load_average": list(os.getloadavg()),
        "summary": summary,
        "floors": floors,
        "rows": results,
    }
    save_json(args.out, report)
    if args.sheet:
        scale = lambda image: image.repeat_interleave(2, 0).repeat_interleave(2, 1)  # noqa: E731
        rows = [[scale(image) for image in row] for row in sheet_rows[: args.sheet_rows]]
        for given, panorama in outpaint_rows[: args.sheet_rows]:
            pad = torch.ones(panorama.shape[0] * 2, panorama.shape[1] * 2, 3)
            pad[: given.shape[0] * 2, : given.shape[1] * 2] = scale(given)
            rows.append([pad, scale(panorama)] + [torch.ones_like(pad)] * (len(ARMS) - 1))
        save_image(args.sheet, image_grid(rows))
    print(json_summary(summary, floors))
    return report


def json_summary(summary: Dict[str, Dict[str, float]], floors: Dict[str, bool]) -> str:
    """A short human-readable table of the summary."""
    lines = []
    for name, values in summary.items():
        lines.append(f"{name:8s} " + "  ".join(f"{k}={v:.3f}" for k, v in values.items()))
    lines.append("floors: " + ", ".join(f"{k}={'met' if v else 'NOT met'}" for k, v in floors.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
