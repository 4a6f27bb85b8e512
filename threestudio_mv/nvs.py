"""Novel views from a few posed images, guided by depth-warped priors (MVGenMaster at toy scale).

    python -m threestudio_mv.nvs --input_path IMG_OR_DIR --output_path DIR [--nframe 28] [--val_cfg 2.0]
        [--cam_traj bi_direction|swing|free] [--d_phi 160] [--key_rescale 1.2] [--target_cameras FILE] [--seed S]
    python -m threestudio_mv.nvs train --out RUN --steps N [...]          (the novel-view model)
    python -m threestudio_mv.nvs train-depth --out RUN --steps N [...]    (the monocular depth estimator)

``--input_path``: an image file is one reference, assumed seen from azimuth 0 at the model's default
elevation, FOV and framing, its depth estimated by the bundled estimator; a folder holds images +
``transforms.json`` (posed references, the procedural renders' format: RGBA, OpenGL c2w, z-up world,
object at the origin), whose ``depth_file_path`` (z-depth .npy) is used when given, else estimated.
All frames of a sample are generated in one pass: ``--nframe`` counts the references, as the
paper's; above 28 frames the reference keys are rescaled by ``--key_rescale``.

Writes ``DIR/frames/frame_<i>.png`` (RGBA; alpha = the generated foreground), ``DIR/video.mp4`` and
``DIR/transforms.json``: the references then the trajectory's frames, or, with ``--target_cameras``,
exactly that file's frames in its order. ``python -m threestudio_mv.launch --config
configs/reconstruction.yaml --train --export data.root=DIR`` fits it: a few photos -> mesh.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from threestudio_mv.utils.camera import TRAJECTORIES, load_camera_file, orbit_trajectory
from threestudio_mv.utils.cli import run_subcommand
from threestudio_mv.utils.errors import UserError, exit_on_user_error
from threestudio_mv.utils.io import atomic_directory, save_image, save_json, save_video

CONVENTION = ("transform_matrix is camera-to-world; OpenGL camera axes (x right, y up, looking down -z); columns right, "
              "up, back, position; world z up, object at the origin")


def _resize(x: Tensor, size: int, mode: str) -> Tensor:
    """(N, H, W) or (N, C, H, W) -> spatial size x size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    squeeze = x.ndim == 3
    x = x[:, None] if squeeze else x
    kwargs = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(x.float(), size=(size, size), mode=mode, **kwargs)
    return out[:, 0] if squeeze else out


def _estimate_depth(rgb: Tensor, alpha: Tensor, fovy: Tensor, depth_model: Optional[str]) -> Tensor:
    from threestudio_mv.models.depth_estimator import DepthEstimator

    return DepthEstimator.from_pretrained(Path(depth_model) if depth_model else None).estimate(rgb, fovy, alpha)


def load_references(input_path: str, size: int, default_camera: Dict[str, float], depth_model: Optional[str] = None,
                    estimate_depth: bool = False) -> Dict[str, Any]:
    """The references of ``--input_path`` at ``size`` px: ``rgb`` (R, 3, S, S) in [0, 1] over white,
    ``alpha`` (R, S, S), ``depth`` (R, S, S) z-depth (0 off the object), ``c2w`` (R, 4, 4), ``fovy`` (R,),
    ``depth_source`` ("given" or "estimated"), ``light`` (the light ``transforms.json`` records, else None). ``estimate_depth`` ignores depth files. UserErrors
    name bad input: a missing path or transforms.json, 0 references, non-rigid cameras, missing images."""
    from threestudio_mv.data.foreground import frame_image, read_rgba
    from threestudio_mv.data.posed_images import TRANSFORMS_NAME, load_posed_images
    from threestudio_mv.utils.camera import c2w_from_spherical, distance_for_fovy

    path = Path(input_path).expanduser()
    if path.is_file():
        rgba = frame_image(read_rgba(path, threshold=0.1), size, recenter=False, object_fraction=1.0)  # premultiplied
        alpha = rgba[..., 3][None]
        rgb = (rgba[..., :3] + (1.0 - rgba[..., 3:])).permute(2, 0, 1)[None].clamp(0.0, 1.0)
        fovy = torch.tensor([default_camera["fovy"]])
        distance = distance_for_fovy(torch.tensor([default_camera["relative_distance"]]), fovy)
        c2w = c2w_from_spherical(torch.tensor([default_camera["elevation"]]), torch.zeros(1), distance)
        return {"rgb": rgb, "alpha": alpha, "c2w": c2w, "fovy": fovy, "light": None,
                "depth": _estimate_depth(rgb, alpha, fovy, depth_model), "depth_source": "estimated"}
    if not path.is_dir():
        raise UserError(f"--input_path '{input_path}' does not exist")
    transforms = path / TRANSFORMS_NAME
    if not transforms.is_file():
        raise UserError(f"--input_path '{input_path}' is a folder without {TRANSFORMS_NAME}; give posed images or one image file")
    try:
        frames = json.loads(transforms.read_text()).get("frames")
    except (json.JSONDecodeError, AttributeError):
        frames = None  # load_posed_images names the fault
    if isinstance(frames, list) and not frames:
        raise UserError(f"{transforms}: 0 references ('frames' is empty); give 1-3 posed images")
    views = load_posed_images(path)
    if views.height != views.width:
        raise UserError(f"{transforms}: images are {views.width}x{views.height}; novel views need square images")
    count = views.rgb.shape[0]
    rgb = _resize(views.rgb.permute(0, 3, 1, 2), size, "bilinear").clamp(0.0, 1.0)
    alpha = _resize(views.mask[..., 0], size, "bilinear")
    fovy = torch.full((count,), float(views.fovy))
    depth_files = [frame.get("depth_file_path") for frame in frames] if isinstance(frames, list) else []
    if not estimate_depth and depth_files and all(isinstance(name, str) for name in depth_files):
        depths = []
        for name in depth_files:
            try:
                depths.append(torch.from_numpy(np.load(path / name).astype(np.float32)))
            except (OSError, ValueError) as error:
                raise UserError(f"{transforms}: cannot read depth '{name}' ({type(error).__name__})") from None
            if depths[-1].shape != (views.height, views.width):
                raise UserError(f"{transforms}: depth '{name}' is {tuple(depths[-1].shape)}, its image {views.height}x{views.width}")
        depth = _resize(torch.stack(depths), size, "nearest")
        depth = torch.where(alpha >= 0.5, depth, torch.zeros_like(depth))
        source = "given"
    else:
        depth, source = _estimate_depth(rgb, alpha, fovy, depth_model), "estimated"
    return {"rgb": rgb, "alpha": alpha, "c2w": views.c2w, "fovy": fovy, "depth": depth, "depth_source": source, "light": views.light}


def foreground_alpha(images: Tensor) -> Tensor:
    """Alpha (N, S, S) of generated images (N, 3, S, S) in [0, 1]: their foreground against the white
    background (the evaluations' one foreground rule, despeckled with a 3x3 median as the text-to-views
    evaluation does: a small model leaves isolated coloured pixels in the background)."""
    from threestudio_mv.eval.metrics import foreground_mask

    return torch.stack([torch.from_numpy(foreground_mask(image.permute(1, 2, 0), despeckle=True).astype(np.float32)) for image in images])


def write_views(out: Path, images: Tensor, alpha: Tensor, c2w: Tensor, fovy: Tensor, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Path]:
    """Write ``frames/frame_<i>.png`` (RGBA), ``video.mp4`` and ``transforms.json`` (frames in order)
    for images (N, 3, S, S) in [0, 1] with alpha (N, S, S) and cameras c2w (N, 4, 4), fovy (N,)."""
    frames = []
    rgb = images.permute(0, 2, 3, 1).clamp(0.0, 1.0)
    for index in range(images.shape[0]):
        name = f"frames/frame_{index:03d}.png"
        save_image(out / name, torch.cat([rgb[index], alpha[index][..., None]], dim=-1))
        frames.append({"file_path": name, "transform_matrix": c2w[index].tolist(), "fovy": float(fovy[index])})
    big = rgb.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)  # 32 px is too small to watch
    save_video(out / "video.mp4", list(big.numpy()), fps=8)
    size = images.shape[-1]
    angle_x = math.radians(float(fovy[0]))  # square images: horizontal = vertical FOV
    save_json(out / "transforms.json", {"camera_angle_x": angle_x, "w": size, "h": size, "convention": CONVENTION,
                                        "frames": frames, **(extra or {})})
    return {"transforms": out / "transforms.json", "video": out / "video.mp4", "frames": out / "frames"}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m threestudio_mv.nvs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_path", required=True, help="an image file (one reference) or a folder with transforms.json")
    parser.add_argument("--output_path", required=True, help="output folder")
    parser.add_argument("--nframe", type=int, default=28, help="frames in the one pass, references included (default 28)")
    parser.add_argument("--val_cfg", type=float, default=2.0, help="CFG scale; the unconditional branch has zero cameras and priors")
    parser.add_argument("--cam_traj", default="bi_direction", choices=TRAJECTORIES)
    parser.add_argument("--d_phi", type=float, default=160.0, help="azimuth sweep of the trajectory, degrees")
    parser.add_argument("--key_rescale", type=float, default=1.2, help="reference-key rescale, used when nframe > 28")
    parser.add_argument("--target_cameras", default=None, help="transforms.json of the target cameras (replaces the trajectory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_warp_anchor", action="store_true",
                        help="sample as MVGenMaster: no anchor to the warped reference pixels, no matching to the references' colours")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    parser.add_argument("--model", default=None, help="novel-view model folder (default: the bundled nvs-tiny)")
    parser.add_argument("--depth_model", default=None, help="depth estimator folder (default: the bundled depth-tiny)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Path]:
    from threestudio_mv.models.mvdiffusion.novel_views import NovelViewModel, frame_conditions, generate_views, reference_palette

    out = Path(args.output_path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_path '{args.output_path}' is an existing file; give a folder")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.val_cfg < 1.0 or args.key_rescale <= 0.0:
        raise UserError("--val_cfg must be >= 1 and --key_rescale > 0")
    model = NovelViewModel.from_pretrained(Path(args.model) if args.model else None)
    meta = model.metadata
    camera = {"fovy": meta.default_fovy, "elevation": meta.default_elevation, "relative_distance": meta.default_relative_distance}
    refs = load_references(args.input_path, meta.image_size, camera, args.depth_model)
    count = refs["rgb"].shape[0]
    if count > meta.max_references:
        print(f"note: {count} references; the model was trained with 1-{meta.max_references}", file=sys.stderr)
    if args.target_cameras:
        targets = load_camera_file(args.target_cameras, "--target_cameras")
        target_c2w, target_fovy = targets["c2w"], targets["fovy"]
    else:
        if args.nframe <= count:
            raise UserError(f"--nframe {args.nframe} leaves no target frame after {count} reference(s); it counts the references")
        target_c2w = orbit_trajectory(args.cam_traj, args.nframe - count, refs["c2w"][0], args.d_phi)
        target_fovy = refs["fovy"][:1].expand(target_c2w.shape[0])
    frames = count + target_c2w.shape[0]
    key_rescale = args.key_rescale if frames >= meta.key_rescale_min_frames else 1.0
    cameras = (refs["rgb"], refs["depth"], refs["c2w"], refs["fovy"], target_c2w, target_fovy, meta, refs["alpha"], refs["light"])
    condition = frame_conditions(*cameras)
    anchor = frame_conditions(*cameras, cull_back_faces=True) if meta.anchor_cull_back_faces else None
    palettes = [reference_palette(refs["rgb"], refs["alpha"], meta.background)] if meta.match_reference_colours else None
    start = time.time()
    images = generate_views(model, condition, refs["rgb"], args.val_cfg, args.steps, key_rescale,
                            torch.Generator().manual_seed(args.seed), progress=True,
                            warp_anchor_start=1.0 if args.no_warp_anchor else None, anchor_condition=anchor,
                            palettes=None if args.no_warp_anchor else palettes)
    extra = {"generator": {"input_path": str(args.input_path), "references": count, "frames_in_one_pass": frames,
                           "key_rescale": key_rescale, "val_cfg": args.val_cfg,
                           "warp_anchor": not args.no_warp_anchor, "depth": refs["depth_source"],
                           "seconds": round(time.time() - start, 2)}}
    alpha = foreground_alpha(images)
    alpha[:count] = refs["alpha"]
    c2w, fovy = torch.cat([refs["c2w"], target_c2w]), torch.cat([refs["fovy"], target_fovy])
    first = count if args.target_cameras else 0  # a target file: exactly its frames
    with atomic_directory(out) as tmp:
        write_views(tmp, images[first:], alpha[first:], c2w[first:], fovy[first:], extra)
    return {"transforms": out / "transforms.json", "video": out / "video.mp4", "frames": out / "frames"}


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if run_subcommand(argv, {"train": "threestudio_mv.models.mvdiffusion.novel_views:train_main",
                             "train-depth": "threestudio_mv.models.depth_estimator:train_main"}):
        return
    written = run(parse_args(argv))
    print(f"wrote {written['frames']}/, {written['video']} and {written['transforms']}")


if __name__ == "__main__":
    main()
