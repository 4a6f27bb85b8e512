"""Text to multi-view images with the multi-view diffusion model.

    python -m threestudio_mv.t2mv --prompt "a red torus" --out grid.png [--model DIR] [--seed 0]
        [--elevation 15] [--azimuth-start 0] [--fovy 40] [--steps 50] [--guidance 5] [--eta 1]

Writes the views side by side to ``grid.png`` and, beside it, ``grid.npz`` with ``images`` (uint8,
V x H x W x 3), ``c2w`` (V x 4 x 4, our camera convention, at the distance that frames the object as
in training), ``fovy``, ``elevation``, ``azimuth`` (V,). Unset options take the model's defaults.
"""
import argparse
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from threestudio_mv.models.mvdiffusion.model import MultiViewDiffusionModel
from threestudio_mv.models.mvdiffusion.pipeline import sample_multiview
from threestudio_mv.utils.camera import view_group
from threestudio_mv.utils.errors import UserError, exit_on_user_error
from threestudio_mv.utils.io import atomic_path, image_grid, save_image


def text_to_multiview(
    model: MultiViewDiffusionModel,
    cond_embeddings: torch.Tensor,
    uncond_embeddings: torch.Tensor,
    elevation: Optional[float] = None,
    azimuth_start: float = 0.0,
    fovy: Optional[float] = None,
    num_inference_steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    seed: int = 0,
    n_view: Optional[int] = None,
    progress: bool = True,
    anchor: bool = True,
    eta: Optional[float] = None,
) -> Dict[str, np.ndarray]:
    """Views of G prompts (``cond_embeddings`` (G, L, D)) on one orbit; None options: model defaults.

    Returns ``images`` uint8 (G, V, H, W, 3) and the cameras ``c2w`` (V, 4, 4), ``fovy``,
    ``elevation``, ``azimuth``, ``camera_distances`` (V,), shared by all prompts.
    """
    meta = model.metadata
    n_view = n_view or meta.n_view
    views = view_group(
        n_view,
        meta.default_elevation if elevation is None else elevation,
        azimuth_start,
        meta.default_fovy if fovy is None else fovy,
        meta.relative_distance,
    )
    groups = cond_embeddings.shape[0]
    images = sample_multiview(
        model,
        cond_embeddings.repeat_interleave(n_view, dim=0),
        uncond_embeddings,
        views["c2w"].repeat(groups, 1, 1),
        n_view,
        guidance_scale=meta.guidance_scale if guidance_scale is None else guidance_scale,
        num_inference_steps=num_inference_steps or meta.num_inference_steps,
        generator=torch.Generator().manual_seed(seed),
        progress=progress,
        anchor=anchor,
        eta=meta.eta if eta is None else eta,
    )
    uint8 = (images.permute(0, 2, 3, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    result = {key: value.numpy().astype(np.float32) for key, value in views.items()}
    result["images"] = uint8.reshape(groups, n_view, *uint8.shape[1:])
    return result


def check_eta(eta: Optional[float]) -> None:
    """One-line error for a DDIM eta outside [0, 1] (None: the model's default)."""
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise UserError(f"--eta must be in [0, 1] (0 deterministic DDIM, 1 DDPM-like), got {eta}")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled mvdream-tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--elevation", type=float, default=None, help="degrees (default: the model's)")
    parser.add_argument("--azimuth-start", type=float, default=0.0, help="degrees; 0 looks from +x (front)")
    parser.add_argument("--fovy", type=float, default=None, help="degrees (default: the model's)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--eta", type=float, default=None,
                        help="DDIM eta in [0, 1]: 0 deterministic, 1 fresh noise every step (default: the model's)")
    parser.add_argument("--cache-dir", default=None, help="text embedding cache folder")
    parser.add_argument("--no-anchor", action="store_true",
                        help="do not anchor each step's x0 to the model's training background (metadata.background)")
    parser.add_argument("--out", required=True, help="output PNG; the cameras go beside it as .npz")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> None:
    from threestudio_mv.models.prompt_processors.mv_prompt_processor import MVPromptProcessor

    args = parse_args(argv)
    if not args.prompt.strip():
        raise UserError('--prompt is empty; describe the object, e.g. --prompt "a red cube"')
    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".png":
        raise UserError(f"--out '{args.out}' must end in .png (the cameras are written beside it as .npz)")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    check_eta(args.eta)
    model = MultiViewDiffusionModel.from_pretrained(args.model)
    prompts = MVPromptProcessor(
        {
            "prompt": args.prompt,
            "negative_prompt": args.negative_prompt,
            "pretrained_model_name_or_path": args.model,
            "cache_dir": args.cache_dir,
        }
    )()
    result = text_to_multiview(
        model, prompts.cond, prompts.uncond, args.elevation, args.azimuth_start, args.fovy, args.steps,
        args.guidance, args.seed, anchor=not args.no_anchor, eta=args.eta,
    )
    images = result.pop("images")[0]
    save_image(out, image_grid([list(images)]))
    with atomic_path(out.with_suffix(".npz")) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, images=images, prompt=np.array(prompts.prompt), **result)
    print(f"wrote {out} and {out.with_suffix('.npz')}")


if __name__ == "__main__":
    main()
