"""CLI of the procedural asset library: ``python -m threestudio_mv.data.procedural <command> --help``."""
import argparse
import math
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from threestudio_mv.utils.errors import UserError, exit_on_user_error

MESH_SUFFIXES = (".ply", ".obj", ".glb")
# One asset of each object, every primitive and a few stacks: the contact sheet's subjects.
SHEET_CAPTIONS = (
    "a red mushroom with a white stem",
    "a brown chair with black legs",
    "a white house with a red roof",
    "a blue mug with a white handle",
    "a white snowman with a black hat",
    "a brown table with black legs",
    "a black lamp with a yellow shade",
    "a green tree with a brown trunk",
    "a white rocket with red fins",
    "a blue car with a white roof",
    "a yellow duck with an orange beak",
    "a gray robot with a red head",
    "a white teapot with a blue lid",
    "a red sphere",
    "an orange cube",
    "a yellow cylinder",
    "a green cone",
    "a purple torus",
    "a pink capsule",
    "a cyan pyramid",
    "a brown ellipsoid",
    "a red cube on top of a green cylinder",
    "a blue sphere on top of a white cube",
    "a yellow cone on top of a purple cylinder",
)


def _vocab(args: argparse.Namespace) -> None:
    from threestudio_mv.data.procedural.captions import vocabulary

    print("\n".join(vocabulary(args.split)))


def _render(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from threestudio_mv.data.procedural import parse_caption, render_views
    from threestudio_mv.utils.camera import CameraLight, load_camera_file, spherical_from_position, view_group
    from threestudio_mv.utils.io import save_image, save_json

    asset = parse_caption(args.prompt)
    light = CameraLight()
    if args.views < 1 or args.size < 1:
        raise UserError("--views and --size must be positive")
    out = Path(args.out)
    if args.cameras:  # ground truth at given cameras (e.g. the targets of novel-view synthesis)
        given = load_camera_file(args.cameras, "--cameras")
        elevation, azimuth, distance = spherical_from_position(given["c2w"][:, :3, 3])
        cameras = {"c2w": given["c2w"], "fovy": given["fovy"], "elevation": elevation, "azimuth": azimuth, "camera_distances": distance}
    else:
        cameras = view_group(args.views, args.elevation, fovy=args.fovy, relative_distance=args.distance)
    count = cameras["c2w"].shape[0]
    frames = []
    for i in tqdm(range(count), desc="rendering", unit="view"):
        view = render_views(asset, cameras["c2w"][i : i + 1], cameras["fovy"][i : i + 1], args.size, light=light)
        rgba = torch.cat([view["rgb_fg"][0], view["alpha"][0, ..., None]], dim=-1)
        save_image(out / f"rgb_{i:03d}.png", rgba)
        np.save(out / f"depth_{i:03d}.npy", view["depth"][0].numpy().astype(np.float32))
        frames.append(
            {
                "file_path": f"rgb_{i:03d}.png",
                "depth_file_path": f"depth_{i:03d}.npy",
                "transform_matrix": cameras["c2w"][i].tolist(),
                "elevation": float(cameras["elevation"][i]),
                "azimuth": float(cameras["azimuth"][i]),
                "fovy": float(cameras["fovy"][i]),
                "camera_distance": float(cameras["camera_distances"][i]),
            }
        )
    save_json(
        out / "transforms.json",
        {
            "caption": asset.caption,
            "camera_angle_x": math.radians(float(cameras["fovy"][0])),
            "w": args.size,
            "h": args.size,
            "convention": "transform_matrix is camera-to-world; OpenGL camera axes (x right, y up, looking "
            "down -z); columns right, up, back, position; world z up, object front facing +x (azimuth 0); "
            "angles in degrees",
            "rgb": "RGBA PNG, straight alpha, composite over any background (rendered over white)",
            "depth": "float32 .npy (H, W): z-depth along the camera's viewing axis in world units, 0 = background",
            # The renderer's light: fixed in the camera frame; shade = ambient + diffuse * max(0, n.l).
            "light": {"direction_camera": list(light.direction_camera), "ambient_ratio": light.ambient_ratio},
            "frames": frames,
        },
    )
    print(f"wrote {count} views of '{asset.caption}' to {out}")


def _mesh(args: argparse.Namespace) -> None:
    from threestudio_mv.data.procedural import asset_mesh, parse_caption
    from threestudio_mv.utils.io import atomic_path

    out = Path(args.out)
    if out.suffix.lower() not in MESH_SUFFIXES:
        raise UserError(f"--out must end with one of {', '.join(MESH_SUFFIXES)} (got '{out.name}')")
    asset = parse_caption(args.prompt)
    mesh = asset_mesh(asset, args.resolution)
    with atomic_path(out) as tmp:
        mesh.export(tmp, file_type=out.suffix.lower()[1:])
    print(f"wrote '{asset.caption}' ({len(mesh.vertices)} vertices, {len(mesh.faces)} faces) to {out}")


def _dataset(args: argparse.Namespace) -> None:
    from threestudio_mv.data.procedural.dataset import write_dataset

    meta = write_dataset(
        args.out, args.num, args.views, args.size, args.split, args.seed, args.workers, args.shard_size
    )
    print(f"dataset of {meta['num_assets']} assets in {meta['num_shards']} shards at {args.out}")


def _sheet(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from threestudio_mv.data.procedural import parse_caption, render_views
    from threestudio_mv.utils.camera import view_group
    from threestudio_mv.utils.io import image_grid, save_image

    cameras = view_group(args.views, args.elevation)
    per_row = 3
    renders = []
    for caption in tqdm(SHEET_CAPTIONS, desc="rendering", unit="asset"):
        renders.append(list(render_views(parse_caption(caption), cameras["c2w"], cameras["fovy"], args.size)["rgb"]))
    rows = [sum(renders[i : i + per_row], []) for i in range(0, len(renders), per_row)]
    save_image(args.out, image_grid(rows, pad=2, pad_value=0.75))
    print(f"wrote {args.out}: {per_row} assets per row, {args.views} views each (azimuth 0 = front); assets:")
    print("\n".join(SHEET_CAPTIONS))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the CLI."""
    parser = argparse.ArgumentParser(prog="python -m threestudio_mv.data.procedural", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    vocab = commands.add_parser("vocab", help="list canonical captions, one a line")
    vocab.add_argument("--split", default="all", choices=["all", "train", "heldout"])
    vocab.set_defaults(run=_vocab)

    render = commands.add_parser("render", help="render an orbit as a nerf-synthetic-style folder")
    render.add_argument("--prompt", required=True)
    render.add_argument("--views", type=int, default=16)
    render.add_argument("--size", type=int, default=64)
    render.add_argument("--out", required=True)
    render.add_argument("--elevation", type=float, default=15.0)
    render.add_argument("--fovy", type=float, default=40.0)
    render.add_argument("--distance", type=float, default=0.92, help="relative distance (scaled by 1/tan(fovy/2))")
    render.add_argument("--cameras", default=None, help="a transforms.json whose frames give the cameras (replaces the orbit: "
                        "--views, --elevation, --fovy, --distance are ignored)")
    render.set_defaults(run=_render)

    mesh = commands.add_parser("mesh", help="export the ground-truth coloured mesh (.ply/.obj/.glb)")
    mesh.add_argument("--prompt", required=True)
    mesh.add_argument("--out", required=True)
    mesh.add_argument("--resolution", type=int, default=128)
    mesh.set_defaults(run=_mesh)

    dataset = commands.add_parser("dataset", help="write a sharded multi-view training set (resumable)")
    dataset.add_argument("--num", type=int, required=True)
    dataset.add_argument("--views", type=int, default=16)
    dataset.add_argument("--size", type=int, default=32)
    dataset.add_argument("--out", required=True)
    dataset.add_argument("--split", default="train", choices=["all", "train", "heldout"])
    dataset.add_argument("--workers", type=int, default=1)
    dataset.add_argument("--seed", type=int, default=0)
    dataset.add_argument("--shard-size", type=int, default=64)
    dataset.set_defaults(run=_dataset)

    sheet = commands.add_parser("sheet", help="contact sheet PNG of 24 assets x 4 views")
    sheet.add_argument("--out", required=True)
    sheet.add_argument("--views", type=int, default=4)
    sheet.add_argument("--size", type=int, default=64)
    sheet.add_argument("--elevation", type=float, default=15.0)
    sheet.set_defaults(run=_sheet)
    return parser


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> None:
    """Run the CLI."""
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
