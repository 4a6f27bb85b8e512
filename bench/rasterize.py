"""The mesh rasteriser (rasterize + interpolate + antialias, forward + backward) on CPU, as JSON.

A 20,480-triangle icosphere (radius 0.5) seen by ``--views`` cameras at 64 and 256 px: seconds per
view and views per second of threestudio_mv.utils.rasterize, against a brute-force baseline in the
same run (every pixel tested against every triangle, nearest depth wins; timed on every
(size/64)-th row of one view and scaled), whose triangle ids it must match.

    python bench/rasterize.py [--sizes 64 256] [--views 4] [--repeats 3]
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when not pip-installed

from render import time_it  # noqa: E402  (bench/render.py: median seconds after a warm-up run)
from threestudio_mv.utils import camera  # noqa: E402
from threestudio_mv.utils import rasterize as raster  # noqa: E402
from threestudio_mv.utils.errors import exit_on_user_error  # noqa: E402


def brute_force_ids(pixels: torch.Tensor, faces: torch.Tensor, rows: torch.Tensor, width: int, chunk: int = 256) -> torch.Tensor:
    """Triangle id per pixel (len(rows), W) of one view's ``rows``, testing every pixel centre against every
    triangle."""
    centres = torch.stack(torch.meshgrid(rows.double() + 0.5, torch.arange(width).double() + 0.5, indexing="ij"), -1)
    centres = centres.reshape(-1, 2).flip(-1).double()  # (column, row)
    tri = pixels[faces].double()  # (F, 3, 3)
    a, b, c = tri[:, 0, :2], tri[:, 1, :2], tri[:, 2, :2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    ids = torch.full((centres.shape[0],), -1, dtype=torch.long)
    for start in range(0, centres.shape[0], chunk):
        point = centres[start : start + chunk, None]  # (P, 1, 2)

        def edge(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return (v[:, 0] - u[:, 0]) * (point[..., 1] - u[:, 1]) - (v[:, 1] - u[:, 1]) * (point[..., 0] - u[:, 0])

        w0, w1, w2 = edge(b, c), edge(c, a), edge(a, b)
        sign = torch.sign(area)
        inside = (w0 * sign > 0) & (w1 * sign > 0) & (w2 * sign > 0) & (area != 0)
        inverse_depth = (w0 / tri[:, 0, 2] + w1 / tri[:, 1, 2] + w2 / tri[:, 2, 2]) / area
        depth = torch.where(inside, 1.0 / inverse_depth, torch.full_like(inverse_depth, float("inf")))
        best, face = depth.min(dim=1)
        ids[start : start + chunk] = torch.where(torch.isfinite(best), face, -1)
    return ids.view(len(rows), width)


def render_loss(vertices: torch.Tensor, faces: torch.Tensor, mvp: torch.Tensor, size: int) -> torch.Tensor:
    """Forward + backward of a shaded silhouette render; returns the vertex gradient."""
    vertices = vertices.detach().requires_grad_(True)
    clip = torch.cat([vertices, torch.ones_like(vertices[:, :1])], -1) @ mvp.transpose(1, 2)
    rast = raster.rasterize(clip, faces, size, size)
    normal = raster.interpolate(vertices, rast)
    image = raster.antialias(normal * rast.mask + (1.0 - rast.mask), rast)
    image.square().mean().backward()
    return vertices.grad


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float32)
    faces = torch.tensor(sphere.faces, dtype=torch.long)
    azimuth = torch.arange(args.views, dtype=torch.float32) * (360.0 / args.views)
    c2w = camera.c2w_from_spherical(torch.full_like(azimuth, 15.0), azimuth, torch.full_like(azimuth, 1.6))
    fovy = torch.full_like(azimuth, 40.0)
    mvp = camera.mvp_matrix(c2w, fovy)
    results: Dict[str, object] = {"triangles": int(faces.shape[0]), "views": args.views, "threads": torch.get_num_threads(), "by_size": {}}
    for size in args.sizes:
        clip = torch.cat([vertices, torch.ones_like(vertices[:, :1])], -1) @ mvp.transpose(1, 2)
        rast = raster.rasterize(clip, faces, size, size)
        # The baseline on every ``stride``-th row of the first view (about 64 rows), timed and scaled to a view.
        stride = max(1, size // 64)
        rows = torch.arange(0, size, stride)
        start = time.perf_counter()
        reference = brute_force_ids(rast.pixels[0], faces, rows, size)
        brute_seconds = (time.perf_counter() - start) * stride
        fwd_bwd = time_it(lambda: render_loss(vertices, faces, mvp, size), args.repeats) / args.views
        rasterize_only = time_it(lambda: raster.rasterize(clip, faces, size, size), args.repeats) / args.views
        results["by_size"][str(size)] = {
            "seconds_per_view_fwd_bwd": fwd_bwd,
            "views_per_second_fwd_bwd": 1.0 / fwd_bwd,
            "seconds_per_view_rasterize": rasterize_only,
            "brute_force_seconds_per_view_rasterize (baseline)": brute_seconds,
            "speed-up of rasterize over brute force": brute_seconds / rasterize_only,
            "ids_equal_to_brute_force (rows checked)": float((rast.face_id[0, rows] == reference).float().mean()),
            "coverage": float((rast.face_id >= 0).float().mean()),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
