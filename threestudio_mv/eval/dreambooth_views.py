"""Does a personalised model draw its subject's 4 views consistently? (MVDreamBooth, in 2D)

    python -m threestudio_mv.eval.dreambooth_views --subject photos --prompt "a sks dumbbell" \
        --models outputs/eval-dreambooth/photos/personalised/subject/model [MORE ...] [--out views.json]

Each model (and the bundled base model first, the baseline) samples the prompt's 4 views at several
orbit starts and seeds; each set's silhouettes are scored against the subject rendered at the same
cameras, at the best common turn about the vertical axis (a generated object's facing is free, but
its 4 views must agree with one facing of the subject). A model that draws the same side from every
camera scores low, and its 3D stage averages that side around the axis into a round blob: this
separates a fine-tune that failed in 2D from a 3D stage that lost the subject. Prints JSON.
"""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from threestudio_mv.eval.dreambooth_eval import build_subject, model_encoder
from threestudio_mv.eval.metrics import foreground_mask, silhouette_iou
from threestudio_mv.eval.subjects import MESH_DIR, Subject
from threestudio_mv.utils.camera import view_group
from threestudio_mv.utils.errors import exit_on_user_error
from threestudio_mv.utils.io import save_json

TURN_STEP_DEG = 22.5


def best_turn_iou(masks: Sequence[np.ndarray], subject: Subject, elevation: float, azimuth_start: float, fovy: float,
                  turn_step_deg: float = TURN_STEP_DEG) -> Dict[str, float]:
    """Mean silhouette IoU of one orbit's masks (4 views from ``azimuth_start``, 360/4 apart) against
    the subject seen from the same cameras turned by a common angle, at the best angle."""
    size = masks[0].shape[0]
    best = {"iou": -1.0, "turn_deg": 0.0}
    for turn in np.arange(0.0, 360.0, turn_step_deg):
        cameras = view_group(len(masks), elevation, azimuth_start + float(turn), fovy)
        truth = subject.render(cameras["c2w"], cameras["fovy"], size)[..., 3].numpy()
        iou = float(np.mean([silhouette_iou(mask, alpha) for mask, alpha in zip(masks, truth)]))
        if iou > best["iou"]:
            best = {"iou": iou, "turn_deg": float(turn)}
    return best


def model_view_scores(folder: Optional[str], subject: Subject, prompt: str, starts: Sequence[float], seeds: Sequence[int]) -> Dict[str, Any]:
    """``best_turn_iou`` of a model's 4-view samples of ``prompt`` over orbit ``starts`` x ``seeds``."""
    from threestudio_mv.models.mvdiffusion.model import MultiViewDiffusionModel
    from threestudio_mv.t2mv import text_to_multiview

    model = MultiViewDiffusionModel.from_pretrained(folder)
    encode = model_encoder(model)
    cond, uncond = encode([prompt + model.metadata.prompt_suffix]), encode([""])
    sets = []
    with torch.no_grad():
        for seed in seeds:
            for start in starts:
                views = text_to_multiview(model, cond, uncond, azimuth_start=start, seed=seed, progress=False)
                masks = [foreground_mask(image / 255.0) for image in views["images"][0]]
                score = best_turn_iou(masks, subject, float(views["elevation"][0]), start, float(views["fovy"][0]))
                sets.append({"seed": seed, "azimuth_start": start, **score})
    return {"model": folder or "bundled base", "view_iou": float(np.mean([s["iou"] for s in sets])), "sets": sets}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m threestudio_mv.eval.dreambooth_views", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject", required=True, help="procedural, teddy, blub, photos or FILE:COLOUR:CLASS WORD")
    parser.add_argument("--prompt", required=True, help='the personalised prompt, e.g. "a sks dumbbell"')
    parser.add_argument("--models", nargs="+", required=True, help="personalised model folders")
    parser.add_argument("--mesh-dir", type=Path, default=MESH_DIR)
    parser.add_argument("--starts", nargs="+", type=float, default=[0.0, 45.0, 90.0], help="orbit starts (degrees)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    subject = build_subject(args.subject, args.mesh_dir).subject
    rows = [model_view_scores(folder, subject, args.prompt, args.starts, args.seeds) for folder in [None, *args.models]]
    result = {"subject": subject.name, "prompt": args.prompt, "models": rows}
    print(json.dumps({"subject": subject.name, "view_iou": {row["model"]: round(row["view_iou"], 4) for row in rows}}, indent=2))
    if args.out is not None:
        save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
