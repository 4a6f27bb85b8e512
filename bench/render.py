"""Rays per second of the nerf-volume-renderer on CPU, forward + backward, printed as JSON.

For each encoding (hash grid, triplane, dense grid), with and without empty-space skipping, against
a naive baseline in the same run: dense sampling (no skipping) with a hash grid looked up by a
per-level Python loop. The field is the fresh implicit-volume's blob (softplus(10 (1 - |x| / 0.5))),
so only a sphere of radius ~0.6 (about 10% of the box) is occupied and skipping matters. Also times
the hash-grid encoding alone (vectorised vs per-level loop) at the renderer's sample count.

    python bench/render.py [--size 32] [--views 4] [--samples 64] [--repeats 3]
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when not pip-installed

import threestudio_mv  # noqa: E402
from threestudio_mv.models.encodings import HashGrid  # noqa: E402
from threestudio_mv.utils import camera  # noqa: E402
from threestudio_mv.utils.errors import exit_on_user_error  # noqa: E402

HASH_GRID = {"otype": "HashGrid", "n_levels": 16, "n_features_per_level": 2, "log2_hashmap_size": 19,
             "base_resolution": 16, "per_level_scale": 1.447269237440378}
ENCODINGS = {
    "hash_grid": HASH_GRID,
    "triplane": {"otype": "Triplane", "resolution": 128, "n_features": 16},
    "dense_grid": {"otype": "DenseGrid", "resolution": 64, "n_features": 16},
}


class PerLevelLoopHashGrid(HashGrid):
    """The naive baseline: the same hash grid, one level (and one corner) at a time in Python."""

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        layout, n_feats = self.layout, self.cfg.n_features_per_level
        table = self.params.view(-1, n_feats)
        primes = (1, 2654435761, 805459861)
        outputs = []
        for level in range(self.cfg.n_levels):
            position = x * layout.scales[level] + 0.5
            cell = torch.floor(position)
            frac = position - cell
            cell = cell.long()
            resolution, size = layout.resolutions[level], layout.sizes[level]
            level_out = 0
            for corner in range(8):
                bits = [(corner >> d) & 1 for d in range(3)]
                coords = [cell[:, d] + bits[d] for d in range(3)]
                if level < layout.n_dense_levels:
                    index = (coords[0] + coords[1] * resolution + coords[2] * resolution**2) % size
                else:
                    index = (coords[0] * primes[0] ^ coords[1] * primes[1] ^ coords[2] * primes[2]) & (size - 1)
                weight = 1
                for d in range(3):
                    weight = weight * (frac[:, d] if bits[d] else 1 - frac[:, d])
                level_out = level_out + weight[:, None] * table[layout.offsets[level] + index]
            outputs.append(level_out)
        return torch.cat(outputs, dim=-1)


def time_it(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_renderer(encoding: Dict[str, Any], grid_prune: bool, samples: int, loop_hash_grid: bool = False):
    geometry = threestudio_mv.find("implicit-volume")({"pos_encoding_config": encoding})
    if loop_hash_grid:
        loop = PerLevelLoopHashGrid(encoding, n_input_dims=3)
        loop.params = geometry.encoding.params
        geometry.encoding = loop
    material = threestudio_mv.find("no-material")({})
    background = threestudio_mv.find("solid-color")({})
    renderer = threestudio_mv.find("nerf-volume-renderer")(
        {"num_samples_per_ray": samples, "grid_prune": grid_prune, "occupancy_warmup_steps": 0},
        geometry=geometry, material=material, background=background,
    )
    if grid_prune:
        for step in range(0, 5 * 16, 16):
            renderer.update_step(0, step)
    return renderer, geometry


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--views", type=int, default=4, help="images per step")
    parser.add_argument("--samples", type=int, default=64, help="samples per ray")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.views
    c2w = camera.c2w_from_spherical(
        torch.full((n,), 15.0), torch.arange(n) * 360.0 / n, torch.full((n,), 2.5)
    )
    rays_o, rays_d = camera.get_rays(camera.camera_ray_directions(args.size, args.size, torch.full((n,), 40.0)), c2w)
    lights = c2w[:, :3, 3]
    n_rays = rays_o.shape[0] * args.size * args.size

    cases = [(name, config, prune, False) for name, config in ENCODINGS.items() for prune in (True, False)]
    cases.append(("naive_hash_grid_per_level_loop", HASH_GRID, False, True))
    results = {}
    for name, config, prune, loop in tqdm(cases, total=len(cases), desc="render cases"):
        renderer, _ = build_renderer(config, prune, args.samples, loop)

        def step() -> int:
            out = renderer(rays_o, rays_d, lights)
            out["comp_rgb"].mean().backward()
            return out["weights"].shape[0]

        evaluated = step()
        seconds = time_it(step, args.repeats)
        key = name if loop else f"{name}_{'skipping' if prune else 'dense'}"
        results[key] = {
            "seconds_per_step": round(seconds, 3),
            "rays_per_second": round(n_rays / seconds),
            "evaluated_samples": evaluated,
            "occupied_cells": round(renderer.occupancy_mask.float().mean().item(), 4) if prune else 1.0,
        }
    baseline = results["naive_hash_grid_per_level_loop"]["seconds_per_step"]
    for value in results.values():
        value["speedup_vs_naive"] = round(baseline / value["seconds_per_step"], 2)

    n_points = n_rays * args.samples
    points = torch.rand(n_points, 3)
    vectorised = HashGrid(HASH_GRID, n_input_dims=3)
    loop = PerLevelLoopHashGrid(HASH_GRID, n_input_dims=3)

    def encode(encoding: HashGrid) -> Callable[[], None]:
        return lambda: encoding(points).square().mean().backward()

    encoding_times = {
        "points": n_points,
        "vectorised_seconds": round(time_it(encode(vectorised), args.repeats), 3),
        "per_level_loop_seconds": round(time_it(encode(loop), args.repeats), 3),
    }
    print(json.dumps({
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "rays_per_step": n_rays,
        "samples_per_ray": args.samples,
        "forward_backward": results,
        "hash_grid_encoding_forward_backward": encoding_times,
    }, indent=2))


if __name__ == "__main__":
    main()
