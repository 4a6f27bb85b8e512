"""How true are the x0-SDS targets? Colour and silhouette of the guidance's x0 targets on TRUE renders
of held-out objects, by CFG scale and x0 denoising steps, printed as JSON (the first setting is the
baseline of the comparison).

For each caption, 4 ground-truth views (elevation 15, 90 degrees apart) are noised at each timestep
with a fixed seed, and ``multiview-diffusion-guidance`` (built from ``configs/mvdream.yaml``'s
``system.guidance`` with ``guidance_scale`` and ``recon_denoise_steps`` replaced) returns its x0
target. A perfect guidance returns the render itself. Per setting and timestep:

- ``delta_e``: mean CIELAB delta-E between the target and the true render over the object's pixels;
- ``saturated``: fraction of object pixels with a channel clamped to 0 or 1 (CFG over-saturation);
- ``silhouette_iou``: IoU of the target's foreground on white with the true mask, per view, as the
  t2mv evaluation measures it (``threestudio_mv.eval.t2mv_eval.foreground`` and ``iou``).

    python bench/x0_targets.py [--scales 20 10 5 3] [--denoise-steps 1] [--std-rescales 0.5] [--timesteps 50 150 300 500]
        [--num 16]
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from omegaconf import OmegaConf
from skimage.color import deltaE_cie76, rgb2lab

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repository, when not pip-installed

import threestudio_mv  # noqa: E402
from threestudio_mv.launch import load_yaml_with_extends, quiet_libraries  # noqa: E402
from threestudio_mv.data.procedural import parse_caption, render_views, vocabulary  # noqa: E402
from threestudio_mv.data.procedural.render import orbit_cameras  # noqa: E402
from threestudio_mv.eval.t2mv_eval import foreground, iou, spread_captions  # noqa: E402
from threestudio_mv.utils.errors import exit_on_user_error  # noqa: E402

CONFIG = REPO / "configs" / "mvdream.yaml"


def target_scores(target: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> List[float]:
    """(delta-E, saturated fraction, silhouette IoU) of targets (V, H, W, 3) in [0, 1] against the truth
    and its masks (V, H, W)."""
    delta_e = deltaE_cie76(rgb2lab(target[mask][None]), rgb2lab(truth[mask][None])).mean()
    saturated = ((target[mask] < 0.01) | (target[mask] > 0.99)).any(-1).mean()
    target_masks = foreground((target * 255.0 + 0.5).astype(np.uint8))
    silhouette = np.mean([iou(a, b) for a, b in zip(target_masks, mask)])
    return [float(delta_e), float(saturated), float(silhouette)]


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[20.0, 10.0, 5.0, 3.0])
    parser.add_argument("--denoise-steps", type=int, nargs="+", default=[1], help="recon_denoise_steps values")
    parser.add_argument("--std-rescales", type=float, nargs="+", default=None,
                        help="recon_std_rescale values (default: the config's)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[50, 150, 300, 500])
    parser.add_argument("--num", type=int, default=16, help="held-out captions, spread over the split")
    args = parser.parse_args()
    quiet_libraries()
    torch.manual_seed(0)  # the chains' ancestral noise
    noise_generator = torch.Generator().manual_seed(0)  # the renders' noise: the same for every setting list
    guidance_cfg = OmegaConf.to_container(load_yaml_with_extends(CONFIG)["system"]["guidance"], resolve=True)
    guidance_type = threestudio_mv.find("multiview-diffusion-guidance")
    rescales = args.std_rescales or [guidance_cfg.get("recon_std_rescale", 0.5)]
    guidances = {
        f"cfg {scale:g}, {steps} step{'s' if steps > 1 else ''}, rescale {rescale:g}": guidance_type(
            {**guidance_cfg, "guidance_scale": scale, "recon_denoise_steps": steps, "recon_std_rescale": rescale}
        )
        for scale in args.scales
        for steps in args.denoise_steps
        for rescale in rescales
    }
    model = next(iter(guidances.values())).model
    for guidance in guidances.values():
        guidance.model = model  # one copy of the weights
    processor_type = threestudio_mv.find("mv-prompt-processor")
    cameras = orbit_cameras(4, elevation=15.0, azimuth_start=30.0)
    scores: Dict[str, Dict[int, List[List[float]]]] = {name: {t: [] for t in args.timesteps} for name in guidances}
    captions = spread_captions(vocabulary("heldout"), args.num)
    for caption in captions:
        prompt = processor_type({"prompt": caption})()
        truth = render_views(parse_caption(caption), cameras["c2w"], cameras["fovy"], size=model.sample_size)
        rgb, mask = truth["rgb"].float(), truth["alpha"].numpy() > 0.5
        for t in args.timesteps:
            noise = torch.randn(4, model.sample_channels, model.sample_size, model.sample_size, generator=noise_generator)
            for name, guidance in guidances.items():
                with torch.no_grad():
                    out = guidance(rgb, prompt.cond, prompt.uncond, cameras["c2w"], 4, timestep=t, noise=noise)
                target = ((out["target"] + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1).numpy()
                scores[name][t].append(target_scores(target, rgb.numpy(), mask))
    result = {"captions": len(captions), "baseline": next(iter(guidances)), "settings": {}}
    for name, by_t in scores.items():
        result["settings"][name] = {
            f"t{t}": dict(zip(("delta_e", "saturated", "silhouette_iou"), np.mean(rows, axis=0).round(3).tolist()))
            for t, rows in by_t.items()
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
