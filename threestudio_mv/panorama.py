"""Text to 360-degree panorama with correspondence-aware attention (MVDiffusion at toy scale).

    python -m threestudio_mv.panorama --prompt "a room with red walls, a brown floor and a white ceiling" \
        --out DIR [--seed 0] [--image VIEW.png] [--model DIR] [--steps N] [--guidance G] [--no-caa] [--no-fusion]
    python -m threestudio_mv.panorama train --stage base|caa --out RUN --steps N [--init MODEL] ...

Writes ``DIR/panorama.png`` (equirectangular, 2:1, tent-blended), ``DIR/views/view_<i>.png`` (8 views,
90-degree FOV, yaw 45 i degrees) and ``DIR/cameras.json`` (``fov_deg``, ``camera_angle_x`` and per view
``file_path``, ``yaw_deg`` and the OpenGL ``c2w``; z-up world, camera at the origin). ``--image``
outpaints the panorama around one given view (view 0, yaw 0), resized to the model's view size. The
8 views are denoised together (CAA), and each step's x0 is fused where views overlap, so the stitched
panorama has no seams (``--no-fusion`` turns that off).
"""
import argparse
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from threestudio_mv.t2mv import check_eta
from threestudio_mv.utils.camera import panorama_yaws, yaw_c2w
from threestudio_mv.utils.cli import run_subcommand
from threestudio_mv.utils.errors import UserError, exit_on_user_error
from threestudio_mv.utils.io import load_image, save_image, save_json


def read_image(path: str) -> np.ndarray:
    """An image file as float RGB (H, W, 3) in [0, 1], alpha composited on white. UserError if it is
    missing or not an image."""
    from PIL import UnidentifiedImageError

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--image '{path}' does not exist")
    try:
        array = load_image(file)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UserError(f"--image '{path}' is not a readable image ({type(error).__name__})") from None
    if array.shape[-1] == 4:
        array = array[..., :3] * array[..., 3:] + (1.0 - array[..., 3:])
    return array


def square_view(array: np.ndarray, size: int) -> torch.Tensor:
    """An RGB image (H, W, 3) in [0, 1] centre-cropped to a square and resized: (3, size, size)."""
    from PIL import Image

    height, width = array.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray((array[top : top + side, left : left + side] * 255.0 + 0.5).astype(np.uint8))
    resized = np.asarray(square.resize((size, size), Image.LANCZOS), dtype=np.float32) / 255.0
    return torch.from_numpy(resized).permute(2, 0, 1)


def write_panorama(out: Path, views: torch.Tensor, yaws: torch.Tensor, fov_deg: float, height: int = 64) -> Dict[str, Path]:
    """Write ``panorama.png``, ``views/view_<i>.png`` and ``cameras.json`` for views (V, 3, S, S) in [0, 1]."""
    from threestudio_mv.models.mvdiffusion.panorama import stitch_equirect

    frames = []
    c2w = yaw_c2w(yaws)
    for index, view in enumerate(views):
        name = f"views/view_{index:02d}.png"
        save_image(out / name, view.permute(1, 2, 0))
        frames.append({"file_path": name, "yaw_deg": float(yaws[index]), "c2w": c2w[index].tolist()})
    cameras = {
        "fov_deg": fov_deg,
        "camera_angle_x": math.radians(fov_deg),
        "convention": "z-up world, OpenGL camera (x right, y up, looking down -z), c2w columns right, up, back, position; camera at the origin, yaw counter-clockwise from +x seen from +z",
        "frames": frames,
    }
    save_json(out / "cameras.json", cameras)
    panorama = stitch_equirect(views, yaws, fov_deg, height)["image"]
    save_image(out / "panorama.png", panorama)
    return {"panorama": out / "panorama.png", "cameras": out / "cameras.json", "views": out / "views"}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m threestudio_mv.panorama", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", required=True, help="a description of the room")
    parser.add_argument("--out", required=True, help="output folder (created; must not be a file)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image", default=None, help="outpaint around this view (view 0, yaw 0)")
    parser.add_argument("--model", default=None, help="panorama model folder (default: the bundled panorama-tiny)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta in [0, 1] (default: the model's)")
    parser.add_argument("--no-caa", action="store_true", help="the base model alone (independent views; for comparison)")
    parser.add_argument("--no-fusion", action="store_true", help="do not fuse the views' overlaps at each step (for comparison)")
    parser.add_argument("--cache-dir", default=None, help="text embedding cache folder")
    return parser.parse_args(argv)


def generate(args: argparse.Namespace) -> Dict[str, Path]:
    from threestudio_mv.models.mvdiffusion.panorama import PanoramaModel, sample_panorama
    from threestudio_mv.models.prompt_processors.cache import CachedTextEncoder

    if not args.prompt.strip():
        raise UserError('--prompt is empty; describe the room, e.g. --prompt "a room with red walls, a brown floor and a white ceiling"')
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{args.out}' is an existing file; give a folder")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    check_eta(args.eta)
    image = read_image(args.image) if args.image else None
    model = PanoramaModel.from_pretrained(args.model)
    given = square_view(image, model.metadata.image_size)[None] if image is not None else None
    texts = CachedTextEncoder(model.build_text_encoder(), Path(args.cache_dir) if args.cache_dir else None)
    views = sample_panorama(
        model, texts.encode([args.prompt.strip()]), texts.encode([""]), given_view=given, use_caa=not args.no_caa,
        fuse_overlaps=not args.no_fusion, num_inference_steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
        generator=torch.Generator().manual_seed(args.seed), progress=True,
    )
    return write_panorama(out, views, panorama_yaws(model.metadata.n_view), model.metadata.fov_deg)


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if run_subcommand(argv, {"train": "threestudio_mv.models.mvdiffusion.panorama:train_main"}):
        return
    written = generate(parse_args(argv))
    print(f"wrote {written['panorama']}, {written['views']}/ and {written['cameras']}")


if __name__ == "__main__":
    main()
