"""Benchmark: forward+backward time per sample of the multi-view UNet vs the same UNet with per-view
attention (F ignored), in one run. Prints JSON.

    python bench/mvunet.py [--groups 8] [--views 4] [--size 32] [--channels 32 64 64] [--repeats 5]
"""
import argparse
import json
import statistics
import time
from typing import Dict, List

import torch

from threestudio_mv.models.mvdiffusion.attention import multiview_processors, per_view_processors
from threestudio_mv.models.mvdiffusion.unet import build_unet, unet_config


def time_train_steps(unet: torch.nn.Module, batch: Dict[str, torch.Tensor], views: int, repeats: int) -> List[float]:
    """Seconds per forward+backward pass (one warm-up pass first)."""
    times = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        out = unet(batch["sample"], batch["timesteps"], batch["text"], class_labels=batch["camera"],
                   cross_attention_kwargs={"num_views": views}).sample
        out.square().mean().backward()
        unet.zero_grad(set_to_none=True)
        if batch["sample"].is_cuda:
            torch.cuda.synchronize()
        if index > 0:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--text-dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    levels = [False] + [True] * (len(args.channels) - 1)
    config = unet_config(sample_size=args.size, block_out_channels=args.channels, attention_levels=levels, cross_attention_dim=args.text_dim)
    unet = build_unet(config).to(args.device)
    n = args.groups * args.views
    generator = torch.Generator().manual_seed(0)
    batch = {
        "sample": torch.randn(n, 3, args.size, args.size, generator=generator),
        "timesteps": torch.randint(0, 1000, (n,), generator=generator),
        "text": torch.randn(n, 24, args.text_dim, generator=generator),
        "camera": torch.randn(n, 16, generator=generator),
    }
    batch = {key: value.to(args.device) for key, value in batch.items()}
    results = {}
    for name, processors in (("multiview", multiview_processors), ("per_view", per_view_processors)):
        unet.set_attn_processor(processors(unet))
        times = time_train_steps(unet, batch, args.views, args.repeats)
        results[name] = {
            "seconds_per_batch_median": statistics.median(times),
            "ms_per_sample_median": 1000.0 * statistics.median(times) / n,
            "seconds_per_batch_all": [round(t, 4) for t in times],
        }
    report = {
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "batch": {"groups": args.groups, "views": args.views, "images": n, "size": args.size},
        "channels": args.channels,
        **results,
        "multiview_over_per_view": results["multiview"]["seconds_per_batch_median"] / results["per_view"]["seconds_per_batch_median"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
