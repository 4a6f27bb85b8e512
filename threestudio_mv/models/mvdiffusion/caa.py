"""Correspondence-aware attention (CAA, MVDiffusion) for the 8 views of a panorama.

Each query pixel p of view i attends to a K x K neighbourhood (K = 3) around its corresponding point
H_{i->j}(p) in each neighbouring view j = i - 1, i + 1 (cyclic): 2 K^2 key/value tokens read bilinearly
(``grid_sample``). Keys and values are the neighbour's features plus a sin/cos encoding of the
sample's offset from p once mapped back into view i (H_{j->i}); the query is p's feature plus the
encoding of a zero offset. Samples outside the neighbour's image are masked out. The attention's
output projection and the last layer of the GEGLU feed-forward start at zero, so a fresh block is the
identity. The views of one panorama share a centre and differ by a fixed yaw step, so the
correspondences are computed once per feature resolution and shared by every panorama.

:class:`CAAUNet` puts one block after each down block (before its downsampler), after the mid block
and after each up block (before its upsampler) of a diffusers ``UNet2DConditionModel``, through
forward hooks, so the base UNet's weights and folder stay untouched; ``min_stride`` leaves out the
finest levels (the bundled pixel-space model skips the full-resolution one).
"""
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention import FeedForward
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from threestudio_mv.utils import camera

CAA_CONFIG = "config.json"
CAA_WEIGHTS = "diffusion_pytorch_model.safetensors"


def offset_encoding(offsets: Tensor, channels: int) -> Tensor:
    """sin/cos encoding (..., channels) of 2-D offsets (..., 2) with channels / 4 frequencies 2^k."""
    frequencies = 2.0 ** torch.arange(channels // 4, dtype=offsets.dtype, device=offsets.device)
    angles = offsets[..., None] * frequencies  # (..., 2, C/4)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def panorama_correspondences(
    height: int, width: int, image_size: int, fov_deg: float, yaw_step: float, kernel: int = 3
) -> Dict[str, Tensor]:
    """Correspondences of an (height, width) feature map of view i in its neighbours i - 1, i + 1.

    Returns ``grid`` (2, h*w, K*K, 2) sample points in ``grid_sample``'s normalised coordinates,
    ``offset`` (2, h*w, K*K, 2) each sample mapped back into view i minus the query (feature pixels)
    and ``valid`` (2, h*w, K*K) samples inside the neighbour's image.
    """
    stride = image_size / width
    K = camera.intrinsics_from_fov(fov_deg, image_size, image_size)
    cams = camera.yaw_c2w(torch.tensor([0.0, -yaw_step, yaw_step]))
    rows, cols = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    query = torch.stack([cols, rows], dim=-1).reshape(-1, 2) * stride  # image pixels
    delta = torch.stack(torch.meshgrid(torch.arange(kernel) - kernel // 2, torch.arange(kernel) - kernel // 2, indexing="xy"), -1)
    delta = delta.reshape(-1, 2).float() * stride
    grids, offsets, valids = [], [], []
    for neighbour in (cams[1], cams[2]):
        to_j = camera.rotation_homography(K, cams[0], neighbour)
        back = camera.rotation_homography(K, neighbour, cams[0])
        centre, front = camera.apply_homography(to_j, query)
        samples = centre[:, None, :] + delta[None]  # (hw, K*K, 2) image pixels of view j
        mapped, front_back = camera.apply_homography(back, samples)
        inside = (samples >= 0).all(-1) & (samples[..., 0] < image_size) & (samples[..., 1] < image_size)
        valids.append(inside & front[:, None] & front_back)
        grids.append(samples / image_size * 2.0 - 1.0)
        offsets.append((mapped - query[:, None, :]) / stride)
    return {"grid": torch.stack(grids), "offset": torch.stack(offsets), "valid": torch.stack(valids)}


class CAABlock(nn.Module):
    """One correspondence-aware attention block on (B*V, C, h, w) features (views contiguous).

    Keys are ``to_k(feature + pe)`` = ``to_k(feature) + to_k(pe)`` (bias-free projections), so the
    features are projected once per pixel and then sampled, and the encodings' projections are shared
    by every panorama; the same holds for values. Mathematically the paper's block, 18x fewer matmuls.
    """

    def __init__(self, channels: int, head_dim: int = 32) -> None:
        super().__init__()
        self.channels = channels
        self.heads = max(1, channels // head_dim)
        self.norm = nn.LayerNorm(channels)  # shared by queries and keys/values
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        self.norm_ff = nn.LayerNorm(channels)
        self.ff = FeedForward(channels, activation_fn="geglu")
        for layer in (self.to_out, self.ff.net[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, num_views: int, corr: Dict[str, Tensor]) -> Tensor:
        bv, c, h, w = x.shape
        heads, d = self.heads, c // self.heads
        normed = self.norm(x.permute(0, 2, 3, 1))  # (BV, h, w, C)
        query = self.to_q(normed + offset_encoding(x.new_zeros(2), c)).reshape(bv, h * w, heads, d)
        kv = torch.cat([self.to_k(normed), self.to_v(normed)], dim=-1).permute(0, 3, 1, 2)  # (BV, 2C, h, w)
        kv = kv.reshape(bv // num_views, num_views, 2 * c, h, w)
        pe = offset_encoding(corr["offset"].to(x), c)  # (2, hw, K*K, C)
        pe_kv = torch.cat([self.to_k(pe), self.to_v(pe)], dim=-1)
        tokens = []
        for side, shift in enumerate((1, -1)):  # neighbour i - 1 (views rolled by +1), then i + 1
            neighbour = kv.roll(shift, dims=1).reshape(bv, 2 * c, h, w)
            grid = corr["grid"][side].to(x)[None].expand(bv, -1, -1, -1)  # (BV, hw, K*K, 2)
            sampled = F.grid_sample(neighbour, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            tokens.append(sampled.permute(0, 2, 3, 1) + pe_kv[side][None])  # (BV, hw, K*K, 2C)
        tokens = torch.cat(tokens, dim=2)  # (BV, hw, 2K^2, 2C)
        key, value = tokens[..., :c].unflatten(-1, (heads, d)), tokens[..., c:].unflatten(-1, (heads, d))
        scores = torch.einsum("bphd,bpthd->bpht", query, key) / math.sqrt(d)
        valid = corr["valid"].to(x.device).permute(1, 0, 2).reshape(1, h * w, 1, -1)  # (1, hw, 1, 2K^2)
        weights = scores.masked_fill(~valid, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        out = torch.einsum("bpht,bpthd->bphd", weights, value).reshape(bv, h, w, c)
        hidden = x.permute(0, 2, 3, 1) + self.to_out(out)
        hidden = hidden + self.ff(self.norm_ff(hidden))
        return hidden.permute(0, 3, 1, 2)


def _hook_points(unet: UNet2DConditionModel) -> List[Tuple[str, nn.Module, int, int]]:
    """(name, module, channels, stride): the last layer before each down block's downsampler, the mid
    block, and the last layer before each up block's upsampler."""
    channels = [int(c) for c in unet.config.block_out_channels]
    levels = len(channels)
    points = []
    for index, block in enumerate(unet.down_blocks):
        last = block.attentions[-1] if getattr(block, "attentions", None) else block.resnets[-1]
        points.append((f"down{index}", last, channels[index], 2**index))
    points.append(("mid", unet.mid_block, channels[-1], 2 ** (levels - 1)))
    for index, block in enumerate(unet.up_blocks):
        last = block.attentions[-1] if getattr(block, "attentions", None) else block.resnets[-1]
        points.append((f"up{index}", last, channels[levels - 1 - index], 2 ** (levels - 1 - index)))
    return points


class CAAUNet(nn.Module):
    """A base UNet with CAA blocks hooked after its down, mid and up blocks.

    ``forward(sample, timestep, text, num_views)`` runs the UNet on (B*V, C, H, W) with the views of one
    panorama contiguous; ``enabled = False`` (or ``num_views == 1``) runs the base UNet alone.
    ``min_stride`` leaves out the levels finer than it: 2 skips the full-resolution level of a
    pixel-space UNet (Stable Diffusion's finest CAA level is 1/8 of the image, the VAE's latent; the
    full-resolution level costs two thirds of all CAA time at 32 px).
    """

    def __init__(self, unet: UNet2DConditionModel, fov_deg: float = 90.0, n_view: int = 8, kernel: int = 3, min_stride: int = 1) -> None:
        super().__init__()
        self.unet = unet
        self.config = {
            "fov_deg": float(fov_deg), "n_view": int(n_view), "kernel": int(kernel),
            "image_size": int(unet.config.sample_size), "min_stride": int(min_stride),
        }
        points = [point for point in _hook_points(unet) if point[3] >= min_stride]
        self.blocks = nn.ModuleDict({name: CAABlock(channels) for name, _, channels, _ in points})
        self.enabled = True
        self._num_views = 1
        self._corr: Dict[Tuple[int, int], Dict[str, Tensor]] = {}
        for name, module, _, _ in points:
            module.register_forward_hook(self._hook(name))

    def _correspondences(self, height: int, width: int) -> Dict[str, Tensor]:
        if (height, width) not in self._corr:
            cfg = self.config
            self._corr[(height, width)] = panorama_correspondences(
                height, width, cfg["image_size"], cfg["fov_deg"], 360.0 / cfg["n_view"], cfg["kernel"]
            )
        return self._corr[(height, width)]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if not self.enabled or self._num_views == 1:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = self.blocks[name](hidden, self._num_views, self._correspondences(*hidden.shape[-2:]))
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def forward(self, sample: Tensor, timestep: Tensor, text: Tensor, num_views: int) -> Tensor:
        if num_views > 1 and num_views != self.config["n_view"]:
            raise ValueError(f"CAA was built for {self.config['n_view']} views, got {num_views}")
        self._num_views = num_views
        try:
            return self.unet(sample, timestep, encoder_hidden_states=text).sample
        finally:
            self._num_views = 1

    def save_caa(self, directory: Path) -> None:
        """Write ``config.json`` and the CAA weights (safetensors) into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CAA_CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.blocks.state_dict().items()}, str(directory / CAA_WEIGHTS))

    @classmethod
    def from_folders(cls, unet: UNet2DConditionModel, directory: Optional[Path]) -> "CAAUNet":
        """The UNet with the CAA blocks of ``directory`` (None: fresh, identity blocks)."""
        if directory is None:
            return cls(unet)
        config = json.loads((directory / CAA_CONFIG).read_text())
        model = cls(unet, config["fov_deg"], config["n_view"], config["kernel"], config.get("min_stride", 1))
        model.blocks.load_state_dict(load_file(str(directory / CAA_WEIGHTS)))
        return model

