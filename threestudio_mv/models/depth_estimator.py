"""A small monocular metric-depth estimator for one un-posed image (MVGenMaster uses Depth-Pro there).

Trained here on procedural renders: input the image (RGB in [-1, 1]) and its camera's tan(fovy / 2)
as a constant channel (the framing of the renders is FOV-independent, so metric depth needs the FOV);
output the z-depth (world units, ``depth_scale`` x the first output channel) and the foreground
logit (second channel). The network is diffusers' UNet2DModel at timestep 0 (an encoder-decoder with
skips that we need not write).

Folder: ``model_index.json`` (class, metadata with the training command) + ``unet/`` (diffusers
UNet2DModel, loadable with ``UNet2DModel.from_pretrained``).
"""
import argparse
import dataclasses
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import Tensor, nn

from threestudio_mv.data.procedural.captions import vocabulary
from threestudio_mv.models.mvdiffusion.folder import load_folder_unet, open_model_folder, read_folder_metadata, write_model_folder
from threestudio_mv.models.mvdiffusion.training import TrainingRun
from threestudio_mv.utils.errors import UserError
from threestudio_mv.utils.io import save_json

DEFAULT_DEPTH_MODEL = Path(__file__).resolve().parents[1] / "assets" / "depth-tiny"


@dataclasses.dataclass
class DepthMetadata:
    """What a user of the estimator needs besides the weights."""

    image_size: int = 32
    depth_scale: float = 3.0  # depth = depth_scale * output channel 0
    training_command: str = ""
    description: str = "monocular metric z-depth + foreground of 32 px procedural renders (white background)"


def depth_unet_config(image_size: int = 32) -> Dict:
    """A small plain-conv UNet: 4 inputs (RGB, tan(fovy/2)), 2 outputs (depth, foreground logit)."""
    return {
        "sample_size": image_size, "in_channels": 4, "out_channels": 2, "layers_per_block": 1,
        "block_out_channels": [32, 64, 64], "down_block_types": ["DownBlock2D"] * 3, "up_block_types": ["UpBlock2D"] * 3,
        "norm_num_groups": 16,
    }


class DepthEstimator(nn.Module):
    """Metric z-depth and foreground of single images (see the module docstring)."""

    def __init__(self, unet: UNet2DModel, metadata: DepthMetadata) -> None:
        super().__init__()
        self.unet, self.metadata = unet, metadata

    def forward(self, rgb: Tensor, fovy: Tensor) -> Dict[str, Tensor]:
        """``rgb`` (B, 3, S, S) in [0, 1], ``fovy`` (B,) degrees -> ``depth`` (B, S, S) world units and
        ``foreground`` (B, S, S) logits."""
        tan_half = torch.tan(torch.deg2rad(fovy.float().reshape(-1)) / 2).view(-1, 1, 1, 1).expand(-1, 1, *rgb.shape[-2:])
        out = self.unet(torch.cat([rgb * 2.0 - 1.0, tan_half.to(rgb)], dim=1), 0).sample
        return {"depth": out[:, 0] * self.metadata.depth_scale, "foreground": out[:, 1]}

    @torch.no_grad()
    def estimate(self, rgb: Tensor, fovy: Tensor, alpha: Optional[Tensor] = None) -> Tensor:
        """Z-depth (B, S, S), 0 off the object: where ``alpha`` (B, S, S) < 0.5 if given, else where the
        estimated foreground is unlikely."""
        out = self(rgb, fovy)
        keep = alpha >= 0.5 if alpha is not None else out["foreground"] > 0
        return torch.where(keep, out["depth"].clamp_min(1e-3), torch.zeros_like(out["depth"]))

    def save_pretrained(self, directory: Path) -> Path:
        """Write the model folder atomically (float32: depth in metres wants the precision)."""
        return write_model_folder(directory, type(self).__name__, self.unet, self.metadata, half=False)

    @classmethod
    def from_pretrained(cls, directory: Optional[Path] = None) -> "DepthEstimator":
        """Load a folder (default: the bundled depth-tiny); a UserError names what is missing."""
        folder = open_model_folder(directory, DEFAULT_DEPTH_MODEL, "depth-estimator")
        return cls(load_folder_unet(folder, UNet2DModel), read_folder_metadata(folder, DepthMetadata)).eval()


def depth_loss(out: Dict[str, Tensor], depth: Tensor, alpha: Tensor) -> Tensor:
    """L1 on the depth of covered pixels (alpha >= 0.5) + BCE on the foreground."""
    covered = alpha >= 0.5
    l1 = (out["depth"] - depth).abs()[covered].mean() if bool(covered.any()) else out["depth"].sum() * 0.0
    return l1 + F.binary_cross_entropy_with_logits(out["foreground"], covered.float())


def train(out: Path, steps: int, batch: int = 16, lr: float = 1e-3, ckpt_every: int = 200, seed: int = 0, command: str = "") -> Path:
    """Train (or resume) on random procedural training renders; returns the folder ``<out>/model``."""
    from threestudio_mv.models.mvdiffusion.novel_views import random_cameras, render_with_depth

    torch.manual_seed(seed)
    model = DepthEstimator(UNet2DModel(**depth_unet_config()), DepthMetadata(training_command=command)).train()
    # A plain regression: no EMA (the live weights are exported), no gradient clipping, and the lr
    # decays by a cosine from the first step (no warm-up).
    run = TrainingRun(model, out, steps, lr, warmup=0, ema_decay=None, ckpt_every=ckpt_every, seed=seed, desc="train depth",
                      max_grad_norm=None)
    generator = run.generator
    captions = vocabulary("train")
    while not run.done:
        views = []
        for _ in range(batch // 4):
            caption = captions[int(torch.randint(len(captions), (1,), generator=generator))]
            cams = random_cameras(4, generator)
            views.append({**render_with_depth(caption, cams["c2w"], cams["fovy"], model.metadata.image_size), "fovy": cams["fovy"]})
        rgb, alpha, depth, fovy = (torch.cat([v[key] for v in views]) for key in ("rgb", "alpha", "depth", "fovy"))
        if run.step(depth_loss(model(rgb, fovy), depth, alpha)):
            model.save_pretrained(out / "model")
    run.close()
    save_json(out / "done.json", {"steps": steps, "command": command})
    return out / "model"


def train_main(argv: List[str]) -> None:
    """``python -m threestudio_mv.nvs train-depth --out DIR --steps N [--batch B] [--lr LR] [...]``"""
    parser = argparse.ArgumentParser(prog="python -m threestudio_mv.nvs train-depth", description=train_main.__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", required=True, type=int)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ckpt-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 4:
        raise UserError("--steps must be >= 1 and --batch >= 4")
    torch.set_num_threads(args.threads)
    command = "python -m threestudio_mv.nvs train-depth " + " ".join(argv)
    print(train(args.out, args.steps, args.batch, args.lr, args.ckpt_every, args.seed, command))
