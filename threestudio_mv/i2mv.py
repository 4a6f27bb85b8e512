"""Image to 16 views (MVDiffusion++ at toy scale): one or a few unposed images of an object in, 16
consistent RGBA views at canonical cameras out (8 azimuths x elevations 0 and 30).

    python -m threestudio_mv.i2mv --input IMG [IMG ...] --out DIR [--seed S] [--model DIR] [--steps N]
        [--guidance G] [--no-global-attention]
    python -m threestudio_mv.i2mv train --stage eps1|v1|vmix --out RUN --steps N [--init MODEL] ...

Inputs: RGBA PNGs, or RGB images on a plain background (masked from the border colour), any size and
framing (a folder stands for its images); the object is re-centred and re-framed. Writes
``DIR/view_<i>.png`` (RGBA), ``DIR/transforms.json`` (the procedural renders' format: cameras in the
frame where the first input is seen from azimuth 0, z up) and ``DIR/views.png`` (inputs | generated).
Reconstruct a mesh from them with ``python launch.py --config configs/reconstruction.yaml --train
--export data.root=DIR``, or do both in one command with ``configs/image-to-3d.yaml``.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

from threestudio_mv.utils.cli import run_subcommand
from threestudio_mv.utils.errors import UserError, exit_on_user_error


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m threestudio_mv.i2mv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+", help="1-4 images of one object (or folders of them)")
    parser.add_argument("--out", required=True, help="output folder (created; must not be a file)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="image-to-views model folder (default: the bundled i2mv-tiny)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--mask-threshold", type=float, default=0.1, help="RGB inputs: foreground = differs from the border colour by more")
    parser.add_argument("--no-global-attention", action="store_true", help="per-view attention only (ablation: the views ignore the inputs)")
    parser.add_argument("--colour-match", action=argparse.BooleanOptionalAction, default=None,
                        help="snap the views' colours to the inputs' (default: the model's setting)")
    return parser.parse_args(argv)


def generate(args: argparse.Namespace) -> Path:
    """Read the inputs, sample the 16 views, write them; returns the output folder."""
    import torch

    from threestudio_mv.data.foreground import image_paths, load_object_image
    from threestudio_mv.models.mvdiffusion.image_to_views import ImageToViewsModel, generate_views, write_views

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{args.out}' is an existing file; give a folder")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    paths = image_paths(args.input, "--input")
    model = ImageToViewsModel.from_pretrained(args.model)
    meta = model.metadata
    inputs = torch.stack([load_object_image(p, meta.image_size, meta.object_fraction, args.mask_threshold) for p in paths])
    views = generate_views(model, inputs, args.seed, not args.no_global_attention, args.colour_match,
                           num_inference_steps=args.steps, guidance_scale=args.guidance, progress=True)
    return write_views(out, views, inputs, meta)


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if run_subcommand(argv, {"train": "threestudio_mv.models.mvdiffusion.image_to_views:train_main"}):
        return
    out = generate(parse_args(argv))
    print(f"wrote 16 views, transforms.json and views.png to {out}")


if __name__ == "__main__":
    main()
