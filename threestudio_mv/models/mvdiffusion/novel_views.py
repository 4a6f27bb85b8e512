"""Novel views from a few posed images guided by depth-warped 3D priors (MVGenMaster at toy scale):
the model, its folder, its conditions, its sampler and its training.

A sample is one batch of F frames: the references (clean images, mask 0) then the targets (noisy,
mask 1). Every frame gets, at pixel resolution, its camera as Plucker rays (6 channels, relative to
the first reference, translations normalised as the paper does) and the references' pixels warped
into it through their depth (warped RGB + validity; z-buffer, nearest wins across references); at
1/``ccm_stride`` resolution the warped world coordinates (min-max normalised, sin/cos encoded, +
validity), which a small conv encoder (:class:`PriorEncoder`, last conv zero) adds to ``conv_in``'s
output. Self-attention joins all frames of a sample at the lower-resolution levels; there is no text
(cross-attention sees one learned null token).

Model folder (diffusers layout)::

    model_index.json                                        class, components, metadata
    unet/config.json, unet/diffusion_pytorch_model.safetensors   the UNet (in_channels = 14:
        sample 3, mask 1, Plucker 6, warped RGB 3, validity 1); loads alone with
        UNet2DConditionModel.from_pretrained
    prior_encoder/config.json, prior_encoder/diffusion_pytorch_model.safetensors
        the coordinate-prior encoder and the null token
    scheduler/scheduler_config.json

Training (``python -m threestudio_mv.nvs train``): procedural training assets rendered on the fly with
the renderer's depth, 1-3 references and the rest targets at random poses over the training camera
ranges; loss on the targets only; CFG dropout as the paper (cameras zeroed for 10 % of samples,
priors for 10 % of samples and 15 % of target frames); AdamW, EMA, atomic checkpoints and resume.
"""
import argparse
import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from threestudio_mv.data.foreground import colour_palette, match_palette_by_mask, uncomposite
from threestudio_mv.data.procedural.captions import parse_caption, vocabulary
from threestudio_mv.data.procedural.dataset import BACKGROUND, ELEVATION_RANGE, FOVY_RANGE, RELATIVE_DISTANCE_RANGE
from threestudio_mv.data.procedural.render import render_views
from threestudio_mv.models.mvdiffusion.attention import MultiViewAttnProcessor, multiview_processors
from threestudio_mv.models.mvdiffusion.cfg import anchor_background
from threestudio_mv.models.mvdiffusion.folder import (
    SCHEDULER_CONFIG,
    load_folder_unet,
    load_scheduler_config,
    open_model_folder,
    read_folder_metadata,
    write_model_folder,
)
from threestudio_mv.models.mvdiffusion.model import sd_scheduler_config
from threestudio_mv.models.mvdiffusion.sampler import ddim_sample, noise_targets, target_loss, training_target
from threestudio_mv.models.mvdiffusion.training import TrainingRun
from threestudio_mv.utils.camera import CameraLight, c2w_from_spherical, distance_for_fovy, plucker_rays, relative_cameras
from threestudio_mv.utils.errors import UserError
from threestudio_mv.utils.io import save_json
from threestudio_mv.utils.warp import depth_normals, warp_references

DEFAULT_NVS_MODEL = Path(__file__).resolve().parents[2] / "assets" / "nvs-tiny"
PRIOR_CONFIG = "prior_encoder/config.json"
PRIOR_WEIGHTS = "prior_encoder/diffusion_pytorch_model.safetensors"
SAMPLE_CHANNELS = 3
MASK, PLUCKER, WARPED = slice(0, 1), slice(1, 7), slice(7, 11)  # channels of the pixel-resolution condition
PIXEL_CONDITION_CHANNELS = 11  # mask 1 + Plucker 6 + warped RGB 3 + validity 1


@dataclasses.dataclass
class NovelViewMetadata:
    """What a user of the model needs besides the weights."""

    image_size: int = 32
    max_references: int = 3
    frames_per_sample: int = 8  # training frames per sample (references + targets)
    camera_longest_side: float = 5.0  # camera box normalisation (MVGenMaster's --camera_longest_side)
    ccm_stride: int = 2  # the coordinate prior's resolution is image_size / ccm_stride
    ccm_frequencies: int = 4
    joined_prefixes: List[str] = dataclasses.field(
        default_factory=lambda: ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1"]
    )  # attn1 of these blocks joins all frames of a sample
    guidance_scale: float = 2.0
    num_inference_steps: int = 20
    warp_supersample: int = 1  # reference pixels back-projected as s x s points (utils.warp.warp_references)
    warp_depth_tolerance: float = 0.0  # soft z-buffer: points within this relative depth of the nearest average
    warp_straight_colour: bool = False  # warp the references' un-composited colour (their alpha given)
    warp_relight: bool = False  # re-shade warped colours for each target when the references' light is known
    warp_anchor_start: float = 0.75  # fraction of the DDIM steps after which warped pixels anchor x0 (1: never)
    anchor_cull_back_faces: bool = False  # the anchor's warp drops points whose depth normal faces away from a target
    match_reference_colours: bool = False  # pixels the anchor leaves take the references' nearest colours
    key_rescale_min_frames: int = 29  # the paper rescales reference keys when nframe > 28
    default_fovy: float = 40.0  # a single image without a camera is assumed seen like this
    default_elevation: float = 15.0
    default_relative_distance: float = 0.92
    background: List[float] = dataclasses.field(default_factory=lambda: list(BACKGROUND))
    training_command: str = ""
    description: str = ""

    @property
    def ccm_channels(self) -> int:
        return 3 * 2 * self.ccm_frequencies + 1

    @property
    def condition_channels(self) -> int:
        return PIXEL_CONDITION_CHANNELS + self.ccm_channels


def nvs_unet_config(image_size: int = 32) -> Dict[str, Any]:
    """The UNet: 14 input channels, channels 32/64/64, transformer blocks at the two lower levels,
    a 4-dim cross-attention that sees only the learned null token (no text)."""
    return {
        "sample_size": image_size,
        "in_channels": SAMPLE_CHANNELS + PIXEL_CONDITION_CHANNELS,
        "out_channels": SAMPLE_CHANNELS,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "cross_attention_dim": 4,
        "attention_head_dim": 2,
        "norm_num_groups": 32,
    }


def nvs_scheduler_config() -> Dict[str, Any]:
    """SD's betas with v-prediction and zero terminal SNR (trailing DDIM spacing), as MVGenMaster."""
    return {**sd_scheduler_config(), "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


class PriorEncoder(nn.Module):
    """The coordinate prior at 1/``stride`` resolution -> features at pixel resolution, added to
    ``conv_in``'s output. The last conv starts at zero, so a fresh encoder changes nothing."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 32, stride: int = 2) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "hidden": hidden, "stride": stride}
        self.stride = stride
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU()
        )
        self.out = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, ccm: Tensor) -> Tensor:
        return self.out(F.interpolate(self.body(ccm), scale_factor=self.stride, mode="nearest"))


class ConvInWithPrior(nn.Module):
    """``unet.conv_in`` replaced: the first ``split`` input channels go through the UNet's own conv_in,
    the rest (the coordinate prior, carried nearest-upsampled to pixel resolution so that it can ride
    in the UNet's one input tensor) are pooled back to its resolution and through the encoder."""

    def __init__(self, conv_in: nn.Conv2d, encoder: PriorEncoder, split: int) -> None:
        super().__init__()
        self.conv_in, self.encoder, self.split = conv_in, encoder, split

    def forward(self, x: Tensor) -> Tensor:
        prior = F.avg_pool2d(x[:, self.split :], self.encoder.stride)
        return self.conv_in(x[:, : self.split]) + self.encoder(prior)


class _ScaledKeys:
    """An Attention seen through a proxy whose ``to_k`` multiplies the first ``count`` tokens' keys."""

    def __init__(self, attn: nn.Module, count: int, scale: float) -> None:
        self._attn, self._count, self._scale = attn, count, scale

    def __getattr__(self, name: str) -> Any:
        return getattr(self._attn, name)

    def to_k(self, context: Tensor) -> Tensor:
        key = self._attn.to_k(context)
        factor = torch.ones(key.shape[1], 1, dtype=key.dtype, device=key.device)
        factor[: self._count] = self._scale
        return key * factor


class NovelViewAttnProcessor(MultiViewAttnProcessor):
    """The multi-view processor plus MVGenMaster's key rescale: in joined attention the keys of the
    ``num_references`` reference frames (the first frames of each sample) are multiplied by
    ``key_rescale``, sharpening attention to them when many frames compete (its training-free route
    to ~100 frames in one pass)."""

    def __call__(  # type: ignore[override]
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        temb: Optional[Tensor] = None,
        num_views: int = 1,
        num_references: int = 0,
        key_rescale: float = 1.0,
    ) -> Tensor:
        joined = self.multiview and encoder_hidden_states is None and num_views > 1
        if joined and key_rescale != 1.0 and num_references > 0:
            attn = _ScaledKeys(attn, num_references * hidden_states.shape[1], key_rescale)  # type: ignore[assignment]
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, num_views)


class NovelViewModel(nn.Module):
    """UNet (with :class:`ConvInWithPrior`), null token, noise schedule and :class:`NovelViewMetadata`."""

    def __init__(self, unet: UNet2DConditionModel, encoder: PriorEncoder, null_token: Tensor, scheduler_config: Dict[str, Any], metadata: NovelViewMetadata) -> None:
        super().__init__()
        unet.conv_in = ConvInWithPrior(unet.conv_in, encoder, SAMPLE_CHANNELS + PIXEL_CONDITION_CHANNELS)
        prefixes = tuple(metadata.joined_prefixes)
        processors = multiview_processors(unet, joined=lambda name: name.startswith(prefixes))
        unet.set_attn_processor({name: NovelViewAttnProcessor(p.multiview) for name, p in processors.items()})
        self.unet = unet
        self.null_token = nn.Parameter(null_token.reshape(1, 1, -1).float().clone())
        self.scheduler_config = dict(scheduler_config)
        self.metadata = metadata

    @classmethod
    def create(cls, metadata: Optional[NovelViewMetadata] = None) -> "NovelViewModel":
        """A randomly initialised model (its prior encoder starts as zero)."""
        metadata = metadata or NovelViewMetadata()
        config = nvs_unet_config(metadata.image_size)
        unet = UNet2DConditionModel(**config)
        encoder = PriorEncoder(metadata.ccm_channels, config["block_out_channels"][0], stride=metadata.ccm_stride)
        return cls(unet, encoder, torch.randn(config["cross_attention_dim"]) * 0.1, nvs_scheduler_config(), metadata)

    @property
    def encoder(self) -> PriorEncoder:
        return self.unet.conv_in.encoder

    def forward(self, sample: Tensor, timestep: Tensor, condition: Tensor, num_views: int, num_references: int = 0, key_rescale: float = 1.0) -> Tensor:
        """Model output (v or epsilon, the scheduler's) for ``sample`` (B*F, 3, H, W) with ``condition``
        (B*F, condition_channels, H, W) from :func:`frame_conditions`; ``timestep`` scalar or (B*F,)."""
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device)
        timesteps = timestep.expand(batch) if timestep.ndim == 0 else timestep
        kwargs = {"num_views": num_views, "num_references": num_references, "key_rescale": key_rescale}
        return self.unet(
            torch.cat([sample, condition.to(sample)], dim=1), timesteps, self.null_token.expand(batch, 1, -1), cross_attention_kwargs=kwargs
        ).sample

    # -- folders -------------------------------------------------------------------------------
    def save_pretrained(self, directory: Path) -> Path:
        """Write the model folder atomically (float16 weights): the plain UNet, and the prior encoder
        with the null token in ``prior_encoder/``."""
        wrapper = self.unet.conv_in
        unet = copy.deepcopy(self.unet)
        unet.conv_in = copy.deepcopy(wrapper.conv_in)  # the plain conv_in: unet/ loads alone in diffusers

        def write_prior_encoder(tmp: Path) -> None:
            (tmp / "prior_encoder").mkdir()
            (tmp / PRIOR_CONFIG).write_text(json.dumps(wrapper.encoder.config, indent=2) + "\n")
            weights = {f"encoder.{k}": v for k, v in wrapper.encoder.state_dict().items()}
            weights["null_token"] = self.null_token.detach()
            save_file({k: v.detach().cpu().to(torch.float16).contiguous() for k, v in weights.items()}, str(tmp / PRIOR_WEIGHTS))

        components = {"prior_encoder": ["threestudio_mv.models.mvdiffusion.novel_views", "PriorEncoder"]}
        return write_model_folder(directory, type(self).__name__, unet, self.metadata, self.scheduler_config, components, write_prior_encoder)

    @classmethod
    def from_pretrained(cls, directory: Optional[Path] = None) -> "NovelViewModel":
        """Load a model folder (default: the bundled nvs-tiny). A UserError names what is missing."""
        folder = open_model_folder(directory, DEFAULT_NVS_MODEL, "novel-view", [PRIOR_CONFIG, PRIOR_WEIGHTS, SCHEDULER_CONFIG])
        weights = {k: v.float() for k, v in load_file(str(folder / PRIOR_WEIGHTS)).items()}
        encoder = PriorEncoder(**json.loads((folder / PRIOR_CONFIG).read_text()))
        encoder.load_state_dict({k[len("encoder.") :]: v for k, v in weights.items() if k.startswith("encoder.")})
        unet = load_folder_unet(folder, UNet2DConditionModel)
        metadata = read_folder_metadata(folder, NovelViewMetadata)
        return cls(unet, encoder, weights["null_token"], load_scheduler_config(folder), metadata).eval()


# ------------------------------------------------------------------------------------------- conditions
def encode_coordinates(points: Tensor, valid: Tensor, frequencies: int) -> Tensor:
    """Warped world points (F, 3, h, w) -> [sin/cos codes (F, 6 * frequencies, h, w), validity].

    Min-max normalised to [-1, 1] over the valid pixels of all frames of the sample (MVGenMaster
    normalises each frame alone; one box for all frames keeps a point's code equal in every frame)."""
    mask = valid > 0.5
    if bool(mask.any()):
        chosen = points.permute(1, 0, 2, 3)[:, mask[:, 0]]
        low, high = chosen.min(dim=1).values, chosen.max(dim=1).values
        scale = (high - low).max().clamp_min(1e-6)
        unit = (points - ((low + high) / 2).view(1, 3, 1, 1)) * (2.0 / scale)
    else:
        unit = torch.zeros_like(points)
    bands = (2.0 ** torch.arange(frequencies, dtype=points.dtype, device=points.device)) * math.pi
    angles = unit[:, :, None] * bands.view(1, 1, -1, 1, 1)  # (F, 3, K, h, w)
    codes = torch.cat([angles.sin(), angles.cos()], dim=2).flatten(1, 2) * mask
    return torch.cat([codes, valid], dim=1)


def frame_conditions(
    ref_rgb: Tensor,
    ref_depth: Tensor,
    ref_c2w: Tensor,
    ref_fovy: Tensor,
    target_c2w: Tensor,
    target_fovy: Tensor,
    metadata: NovelViewMetadata,
    ref_alpha: Optional[Tensor] = None,
    light: Optional[CameraLight] = None,
    cull_back_faces: bool = False,
) -> Tensor:
    """The conditions (R + T, condition_channels, S, S) of one sample: references first.

    ``ref_rgb`` (R, 3, S, S) in [0, 1] over the background, ``ref_depth`` (R, S, S) z-depth (0 = no
    depth: background), cameras c2w (R or T, 4, 4) and fovy (degrees). Channels: mask (0 references,
    1 targets), Plucker 6, warped RGB in [-1, 1] (0 where nothing landed), validity, then the
    coordinate prior (nearest-upsampled from 1/ccm_stride resolution). With ``ref_alpha`` (R, S, S)
    and ``metadata.warp_straight_colour`` the warp carries the un-composited colour; with ``light``
    (the references' camera-fixed light, as ``transforms.json`` records it) and ``metadata.warp_relight``,
    :func:`relit_warp` re-shades it for each target. ``cull_back_faces``: the warp drops points facing
    away from a target (``utils.warp.warp_references``): the warp anchor's conditions."""
    size, count = metadata.image_size, ref_rgb.shape[0]
    if count < 1:
        raise UserError("novel views need at least one reference image")
    c2w = torch.cat([ref_c2w, target_c2w]).float()
    fovy = torch.cat([ref_fovy.reshape(-1), target_fovy.reshape(-1)]).float()
    relative, scale = relative_cameras(c2w, c2w[0], metadata.camera_longest_side)
    ref_relative = relative[:count]
    depth = ref_depth.float() * scale
    splatting = {"supersample": metadata.warp_supersample, "depth_tolerance": metadata.warp_depth_tolerance,
                 "cull_back_faces": cull_back_faces}
    colour = ref_rgb.float()
    if metadata.warp_straight_colour and ref_alpha is not None:
        colour = uncomposite(colour, ref_alpha.float()[:, None], metadata.background)
    if metadata.warp_relight and light is not None:
        warped = relit_warp(colour, depth, ref_relative, fovy[:count], relative, fovy, size, light, splatting)
    else:
        warped = warp_references(colour, depth, ref_relative, fovy[:count], relative, fovy, size, **splatting)
    warped["values"] = (warped["values"] * 2.0 - 1.0) * warped["valid"]
    low = size // metadata.ccm_stride
    coarse = warp_references(ref_rgb.float(), depth, ref_relative, fovy[:count], relative, fovy, low, **splatting)
    ccm = encode_coordinates(coarse["points"], coarse["valid"], metadata.ccm_frequencies)
    mask = torch.ones(c2w.shape[0], 1, size, size)
    mask[:count] = 0.0
    pixel = [mask, plucker_rays(relative, fovy, size, size), warped["values"], warped["valid"]]
    return torch.cat(pixel + [F.interpolate(ccm, scale_factor=metadata.ccm_stride, mode="nearest")], dim=1)


def relit_warp(colour: Tensor, depth: Tensor, ref_c2w: Tensor, ref_fovy: Tensor, c2w: Tensor, fovy: Tensor, size: int,
               light: CameraLight, splatting: Dict[str, Any]) -> Dict[str, Tensor]:
    """:func:`warp_references` of ``colour`` (R, 3, S, S) in [0, 1] re-shaded for each target camera
    under ``light``, a light fixed to the camera (the procedural renders' light): a reference pixel's
    albedo is its colour over its shade (normal from the depth map), splatted with its normal, and
    each target pixel's colour is that albedo times its shade as the target sees it. Not in
    MVGenMaster, whose photos share one world-fixed light; here the light turns with the camera, so a
    copied colour is wrong by the change of shade (docs/nvs.md)."""
    def shade(normals: Tensor, cameras: Tensor) -> Tensor:  # (B, H, W, 3) world normals seen by c2w (B, 4, 4) -> (B, 1, H, W)
        per_pixel = cameras[:, :3, :3].float().repeat_interleave(normals.shape[1] * normals.shape[2], dim=0)
        return light.shade(normals.reshape(-1, 3), per_pixel).reshape(normals.shape[0], 1, *normals.shape[1:3])

    normals = depth_normals(depth, ref_c2w, ref_fovy)
    albedo = colour / shade(normals, ref_c2w).clamp_min(1e-3)
    warped = warp_references(torch.cat([albedo, normals.permute(0, 3, 1, 2)], dim=1), depth, ref_c2w, ref_fovy, c2w, fovy, size, **splatting)
    target_normals = F.normalize(warped["values"][:, 3:], dim=1).permute(0, 2, 3, 1)
    warped["values"] = (warped["values"][:, :3] * shade(target_normals, c2w)).clamp(0.0, 1.0)
    return warped


def drop_conditions(condition: Tensor, cameras: bool = False, priors: bool = False) -> Tensor:
    """A copy of ``condition`` (N, C, H, W) with the Plucker rays and/or all priors (warped RGB,
    validity, coordinate prior) zeroed: the unconditional branch is ``cameras=priors=True``."""
    condition = condition.clone()
    if cameras:
        condition[:, PLUCKER] = 0.0
    if priors:
        condition[:, WARPED.start :] = 0.0
    return condition


# ------------------------------------------------------------------------------------------- sampling
FOREGROUND_THRESHOLD = 0.1  # a generated pixel is the object where a channel differs from the background by more

class WarpAnchor:
    """The sampler's x0 transform: the background anchor at every step and, from step ``start_step``
    on, the depth warp's colours on the pixels it covers. Inside the warp (all 8 neighbours covered
    too) x0 takes the warped colour; on its fringe, where a pixel may be partly background, x0 is
    projected onto the line from the background to the warped colour: the warp gives the surface's
    colour, the model how much of the pixel it covers.

    Not in MVGenMaster, which only conditions on the warp. Measured on held-out assets with two
    references (docs/nvs.md): the model's x0 drifts from the references' colours in the last steps
    where the warp is right; anchoring the last quarter lowers the colour error at the same silhouette
    (delta-E 22.5 -> 18.8 for the 6,800-step model); anchoring earlier gains nothing more. With the
    straight-colour warp, anchoring the fringe with the warped colour outright costs 3 dB of PSNR (a
    true edge pixel is a mix with the background); the projection keeps the PSNR of no fringe anchor
    and most of the colour gain. ``ddim_sample`` calls the transform once per step, in order; a new
    instance is made for each sampling run."""

    def __init__(self, condition: Tensor, background: Tensor, start_step: int) -> None:
        self.warped = condition[:, WARPED.start : WARPED.start + 3]
        self.valid = condition[:, WARPED.stop - 1 : WARPED.stop] > 0.5
        self.interior = -F.max_pool2d(-self.valid.float(), 3, stride=1, padding=1) > 0.5  # an erosion
        self.background, self.start_step, self.step = background.view(1, 3, 1, 1), start_step, 0

    def __call__(self, x0: Tensor) -> Tensor:
        x0 = anchor_background(x0, self.background.view(3))
        if self.step >= self.start_step:
            warped, background = self.warped.to(x0), self.background.to(x0)
            away = warped - background
            cover = ((x0 - background) * away).sum(1, keepdim=True) / (away * away).sum(1, keepdim=True).clamp_min(1e-4)
            fringe = background + cover.clamp(0.0, 1.0) * away
            x0 = torch.where(self.interior, warped, torch.where(self.valid, fringe, x0))
        self.step += 1
        return x0


@torch.no_grad()
def generate_views(
    model: NovelViewModel,
    condition: Tensor,
    references: Tensor,
    guidance_scale: Optional[float] = None,
    num_inference_steps: Optional[int] = None,
    key_rescale: float = 1.0,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
    num_samples: int = 1,
    warp_anchor_start: Optional[float] = None,
    anchor_condition: Optional[Tensor] = None,
    palettes: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    """All frames of B = ``num_samples`` samples in one pass: ``condition`` (B*F, C, S, S) from :func:`frame_conditions`
    (each sample's F frames contiguous, references first), ``references`` (B*R, 3, S, S) in [0, 1]
    (every sample has R). CFG's unconditional branch zeroes the cameras and the priors
    (``guidance_scale`` 1: no second branch). ``warp_anchor_start`` (default: the model's): the
    fraction of the steps after which warped pixels anchor x0 (:class:`WarpAnchor`; 1: never).
    ``anchor_condition``: the conditions whose warp anchors x0 (default ``condition``; with the model's
    ``anchor_cull_back_faces``, :func:`frame_conditions` with ``cull_back_faces=True``).
    ``palettes``: per sample, colours (K, 3) (:func:`reference_palette`) that the target pixels the
    anchor did not set are matched to (``data.foreground.match_palette_by_mask``; the model's
    ``match_reference_colours``). Returns (B*F, 3, S, S) in [0, 1]; the reference frames are the
    references, unchanged."""
    meta = model.metadata
    scale = meta.guidance_scale if guidance_scale is None else guidance_scale
    steps = num_inference_steps or meta.num_inference_steps
    anchor_from = meta.warp_anchor_start if warp_anchor_start is None else warp_anchor_start
    total = condition.shape[0]
    if total % num_samples or references.shape[0] % num_samples:
        raise ValueError(f"{total} frames and {references.shape[0]} references do not split into {num_samples} samples")
    frames, count = total // num_samples, references.shape[0] // num_samples
    is_reference = torch.arange(total) % frames < count
    clean = torch.zeros(total, SAMPLE_CHANNELS, meta.image_size, meta.image_size)
    clean[is_reference] = references.float() * 2.0 - 1.0
    uncond = drop_conditions(condition, cameras=True, priors=True)

    def predict(sample: Tensor, timestep: Tensor) -> Tensor:
        if scale == 1.0:
            return model(sample, timestep, condition, frames, count, key_rescale)
        both = model(torch.cat([sample, sample]), timestep, torch.cat([condition, uncond]), frames, count, key_rescale)
        cond_out, uncond_out = both.chunk(2)
        return uncond_out + scale * (cond_out - uncond_out)

    anchor = WarpAnchor(condition if anchor_condition is None else anchor_condition, torch.tensor(meta.background) * 2.0 - 1.0,
                        math.ceil(anchor_from * steps))
    sample = ddim_sample(
        predict, clean.shape, model.scheduler_config, steps, generator=generator,
        references=clean, is_reference=is_reference, x0_transform=anchor, progress=progress, desc="novel views",
    )
    out = ((sample + 1.0) / 2.0).clamp(0.0, 1.0)
    if palettes is not None:
        anchored = anchor.valid if anchor.step > anchor.start_step else torch.zeros_like(anchor.valid)
        background = torch.tensor(meta.background).view(1, 3, 1, 1)
        foreground = ((out - background).abs().amax(dim=1, keepdim=True) > FOREGROUND_THRESHOLD) & ~anchored
        for index, palette in enumerate(palettes):
            part = slice(index * frames, (index + 1) * frames)
            matched = match_palette_by_mask(out[part], foreground[part], palette, meta.background)
            out[part] = torch.where(anchored[part], out[part], matched)
    out[is_reference] = references.float()  # exact: no [-1, 1] round trip
    return out


def reference_palette(rgb: Tensor, alpha: Tensor, background: Sequence[float]) -> Tensor:
    """The colours (K, 3) of references ``rgb`` (R, 3, S, S) over ``background`` with coverage ``alpha``
    (R, S, S): their un-composited colours where mostly covered (``data.foreground.colour_palette``)."""
    coverage = alpha.float()[:, None]
    return colour_palette(uncomposite(rgb.float(), coverage, background), coverage)


# ------------------------------------------------------------------------------------------- data
def random_cameras(count: int, generator: torch.Generator, shared_fovy: bool = False) -> Dict[str, Tensor]:
    """``count`` independent cameras over the training ranges (elevation, any azimuth, FOV, framing);
    ``shared_fovy``: one FOV for all (as the photos of one ``transforms.json``)."""

    def uniform(low: float, high: float, n: int = count) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    elevation, azimuth = uniform(*ELEVATION_RANGE), uniform(-180.0, 180.0)
    fovy = uniform(*FOVY_RANGE, 1).expand(count).clone() if shared_fovy else uniform(*FOVY_RANGE)
    distance = distance_for_fovy(uniform(*RELATIVE_DISTANCE_RANGE), fovy)
    return {"c2w": c2w_from_spherical(elevation, azimuth, distance), "fovy": fovy, "elevation": elevation, "azimuth": azimuth}


def render_with_depth(caption: str, c2w: Tensor, fovy: Tensor, size: int) -> Dict[str, Tensor]:
    """Renders (N, 3, S, S) ``rgb`` in [0, 1] over the background, ``alpha`` (N, S, S) and the
    reference ``depth`` (N, S, S): z-depth where the pixel is mostly covered (alpha >= 0.5), else 0,
    so that fringe pixels (mixed with the background) are not warped."""
    out = render_views(parse_caption(caption), c2w, fovy, size, background=BACKGROUND)
    depth = torch.where(out["alpha"] >= 0.5, out["depth"], torch.zeros_like(out["depth"]))
    return {"rgb": out["rgb"].permute(0, 3, 1, 2).contiguous(), "alpha": out["alpha"], "depth": depth}


def training_sample(caption: str, references: int, metadata: NovelViewMetadata, generator: torch.Generator) -> Dict[str, Tensor]:
    """One training sample: ``clean`` (F, 3, S, S) in [-1, 1] and ``condition`` (F, C, S, S), the first
    ``references`` frames being the references; all cameras random over the training ranges."""
    cams = random_cameras(metadata.frames_per_sample, generator)
    views = render_with_depth(caption, cams["c2w"], cams["fovy"], metadata.image_size)
    r = references
    condition = frame_conditions(views["rgb"][:r], views["depth"][:r], cams["c2w"][:r], cams["fovy"][:r], cams["c2w"][r:], cams["fovy"][r:], metadata,
                                 views["alpha"][:r], CameraLight())
    return {"clean": views["rgb"] * 2.0 - 1.0, "condition": condition}


# ------------------------------------------------------------------------------------------- training
@dataclasses.dataclass
class TrainConfig:
    """A training run (see the module docstring)."""

    out: Path  # run folder: ckpt.pt, log.csv, model/
    steps: int
    samples_per_step: int = 2
    frames: int = 8
    lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.998
    camera_drop: float = 0.1
    prior_drop: float = 0.1
    prior_frame_drop: float = 0.15
    ckpt_every: int = 200
    seed: int = 0
    command: str = ""
    init: Optional[Path] = None  # a novel-view model folder to continue (its training command is chained)
    warp_supersample: Optional[int] = None  # None: the folder's (or the default for a new model)
    warp_depth_tolerance: Optional[float] = None
    warp_straight_colour: Optional[bool] = None
    warp_relight: Optional[bool] = None


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the exported model folder ``<out>/model`` (EMA weights)."""
    torch.manual_seed(cfg.seed)
    warp_keys = ("warp_supersample", "warp_depth_tolerance", "warp_straight_colour", "warp_relight")
    splatting = {key: getattr(cfg, key) for key in warp_keys if getattr(cfg, key) is not None}
    if cfg.init is None:
        meta = NovelViewMetadata(frames_per_sample=cfg.frames, training_command=cfg.command, **splatting,
                                 description="MVGenMaster at toy scale: 32 px procedural objects, 1-3 posed references with depth")
        model = NovelViewModel.create(meta).train()
    else:
        model = NovelViewModel.from_pretrained(cfg.init).train()
        meta = model.metadata = dataclasses.replace(
            model.metadata, frames_per_sample=cfg.frames, training_command=f"{model.metadata.training_command} && {cfg.command}",
            **splatting)
    run = TrainingRun(model, cfg.out, cfg.steps, cfg.lr, cfg.warmup, cfg.ema_decay, cfg.ckpt_every, cfg.seed, desc="train nvs")
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    captions = vocabulary("train")
    rng, generator = run.rng, run.generator

    def export() -> Path:
        with run.ema_weights():
            return model.save_pretrained(cfg.out / "model")

    frames = cfg.frames
    while not run.done:
        clean, condition, is_reference = [], [], []
        for _ in range(cfg.samples_per_step):
            count = rng.randint(1, meta.max_references)
            sample = training_sample(rng.choice(captions), count, meta, generator)
            cond = sample["condition"]
            if rng.random() < cfg.camera_drop:
                cond = drop_conditions(cond, cameras=True)
            if rng.random() < cfg.prior_drop:
                cond = drop_conditions(cond, priors=True)
            else:
                dropped = torch.rand(frames, generator=generator) < cfg.prior_frame_drop
                dropped[:count] = False
                cond[dropped] = drop_conditions(cond[dropped], priors=True)
            clean.append(sample["clean"])
            condition.append(cond)
            is_reference.append(torch.arange(frames) < count)
        clean_t, condition_t, is_reference_t = torch.cat(clean), torch.cat(condition), torch.cat(is_reference)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.samples_per_step,), generator=generator).repeat_interleave(frames)
        noise = torch.randn(clean_t.shape, generator=generator)
        noisy = noise_targets(scheduler, clean_t, noise, timesteps, is_reference_t)
        prediction = model(noisy, timesteps, condition_t, frames)
        if run.step(target_loss(prediction, training_target(scheduler, clean_t, noise, timesteps), is_reference_t)):
            export()
    run.close()
    folder = export()
    save_json(cfg.out / "done.json", {"steps": cfg.steps, "command": cfg.command})
    return folder


def train_main(argv: List[str]) -> None:
    """``python -m threestudio_mv.nvs train --out DIR --steps N [...]``"""
    parser = argparse.ArgumentParser(prog="python -m threestudio_mv.nvs train", description=train_main.__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", required=True, type=int)
    parser.add_argument("--samples-per-step", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8, help="frames per sample (1-3 references, the rest targets)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ckpt-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--init", type=Path, default=None, help="a novel-view model folder to continue training")
    parser.add_argument("--warp-supersample", type=int, default=None, help="reference pixels splatted as s x s points (default: the folder's, 1 for a new model)")
    parser.add_argument("--warp-depth-tolerance", type=float, default=None, help="soft z-buffer tolerance, relative depth (default: the folder's, 0 for a new model)")
    parser.add_argument("--warp-straight-colour", action=argparse.BooleanOptionalAction, default=None,
                        help="warp the references' un-composited colour (default: the folder's, off for a new model)")
    parser.add_argument("--warp-relight", action=argparse.BooleanOptionalAction, default=None,
                        help="re-shade warped colours for each target under the references' recorded light (default: the folder's, off for a new model)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.warp_supersample is not None and args.warp_supersample < 1:
        raise UserError(f"--warp-supersample must be at least 1, got {args.warp_supersample}")
    if args.warp_depth_tolerance is not None and args.warp_depth_tolerance < 0:
        raise UserError(f"--warp-depth-tolerance must be >= 0, got {args.warp_depth_tolerance}")
    if args.frames < NovelViewMetadata.max_references + 1:
        raise UserError(f"--frames must be at least {NovelViewMetadata.max_references + 1} (3 references + a target), got {args.frames}")
    torch.set_num_threads(args.threads)
    command = "python -m threestudio_mv.nvs train " + " ".join(argv)
    cfg = TrainConfig(out=args.out, steps=args.steps, samples_per_step=args.samples_per_step, frames=args.frames, lr=args.lr,
                      ckpt_every=args.ckpt_every, seed=args.seed, command=command, init=args.init,
                      warp_supersample=args.warp_supersample, warp_depth_tolerance=args.warp_depth_tolerance,
                      warp_straight_colour=args.warp_straight_colour, warp_relight=args.warp_relight)
    print(train(cfg))
