"""Benchmark the procedural renderer: images per second at 32 and 64 px, printed as JSON.

Renders ``--assets`` captions spread over the whole vocabulary, each from ``--views`` random
views in groups of 4 (the dataset's cameras), 2x2 supersampled, on ``--threads`` CPU threads.
Usage: python bench/procedural_render.py [--assets 24] [--views 16] [--threads 1]
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when not pip-installed

from threestudio_mv.data.procedural import parse_caption, render_views, vocabulary  # noqa: E402
from threestudio_mv.utils.camera import sample_view_groups  # noqa: E402


def bench(size: int, captions: list, views: int) -> dict:
    """Render every caption once at ``size`` px; return timing numbers."""
    generator = torch.Generator().manual_seed(0)
    cameras = [sample_view_groups(views // 4, 4, generator=generator) for _ in captions]
    assets = [parse_caption(caption) for caption in captions]
    render_views(assets[0], cameras[0]["c2w"], cameras[0]["fovy"], size)  # warm-up
    start = time.perf_counter()
    for asset, camera in tqdm(list(zip(assets, cameras)), desc=f"{size}px", unit="asset"):
        render_views(asset, camera["c2w"], camera["fovy"], size)
    seconds = time.perf_counter() - start
    images = len(captions) * views
    return {"size": size, "images": images, "seconds": round(seconds, 3), "images_per_second": round(images / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=int, default=24)
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    every = vocabulary("all")
    captions = [every[i * len(every) // args.assets] for i in range(args.assets)]
    results = [bench(size, captions, args.views) for size in (32, 64)]
    report = {
        "benchmark": "procedural_render",
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "views_per_asset": args.views,
        "supersample": 2,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
