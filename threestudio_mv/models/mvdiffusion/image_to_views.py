"""Image to 16 views (MVDiffusion++ at toy scale): a pose-free image-conditioned multi-view model, its
folder, its sampler and its three-stage training.

One sample is the frames of one object: K condition views (the input images, unposed, RGBA re-framed
to the object, clean, mask channel 1) followed by the 16 targets (noisy RGBA, mask channel 0) at fixed
canonical cameras: 8 azimuths 45 degrees apart x elevations 0 and 30, the first azimuth the first
input's. There is no camera input: the UNet's class embedding is a learned *target index* (0 for
conditions, 1..16 for the targets) added to the timestep embedding. The UNet's self-attention (attn1)
joins the tokens of all frames of a sample (global attention); the UNet has transformer blocks only
at its two lower resolutions (16 and 8 px for 32 px views), so the full-resolution level stays
per-view. The joined attn1's output projection starts at zero. There is no text: cross-attention
(diffusers' transformer blocks always have it) sees one constant zero token.

Model folder (diffusers layout)::

    model_index.json     class, components, metadata (:class:`ImageToViewsMetadata`, incl. the training command)
    unet/config.json, unet/diffusion_pytorch_model.safetensors   (float16; UNet2DConditionModel.from_pretrained loads it)
    scheduler/scheduler_config.json   (prediction_type: epsilon after stage 1, v_prediction after 2 and 3)

Training (``python -m threestudio_mv.i2mv train --stage eps1|v1|vmix --out RUN --steps N [--init MODEL]``),
the paper's three stages: ``eps1`` epsilon loss with one input; ``v1`` v-prediction with one input
(from eps1's model); ``vmix`` v-prediction, half the steps one input, half 2..max_inputs (from v1's).
Each step renders ``objects_per_step`` random training assets on the fly (the procedural renderer
does 16 views of 32 px in ~20 ms, so no cache is needed): K condition views at random poses (elevation,
FOV and distance over the training renders' ranges, any azimuth) re-framed like user inputs, and a
random subset of ``train_targets`` of the 16 targets (view dropout); the loss is on the targets
only. 10 % of the steps drop the conditions (classifier-free guidance). AdamW, EMA, an atomic
checkpoint every ``--ckpt-every`` steps, resume from it; after the stage a quick quality check
(silhouette IoU, PSNR, delta-E of the 16 views of held-out assets from one input) and a figure.
"""
import argparse
import dataclasses
import math
import random
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from threestudio_mv.data.foreground import colour_palette, frame_image, match_palette, uncomposite
from threestudio_mv.data.procedural.captions import parse_caption, vocabulary
from threestudio_mv.data.procedural.colours import COLOUR_NAMES
from threestudio_mv.data.procedural.dataset import BACKGROUND, ELEVATION_RANGE, FOVY_RANGE, RELATIVE_DISTANCE_RANGE
from threestudio_mv.data.procedural.render import render_views
from threestudio_mv.models.mvdiffusion.attention import multiview_processors, per_view_processors
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
from threestudio_mv.utils.camera import c2w_from_spherical, distance_for_fovy, view_group
from threestudio_mv.utils.errors import UserError
from threestudio_mv.utils.io import image_grid, save_image, save_json

DEFAULT_I2MV_MODEL = Path(__file__).resolve().parents[2] / "assets" / "i2mv-tiny"
CHANNELS = 4  # RGBA: RGB composited over the background, and alpha
STAGES = {"eps1": "epsilon", "v1": "v_prediction", "vmix": "v_prediction"}


@dataclasses.dataclass
class ImageToViewsMetadata:
    """What a user of the model needs besides the weights."""

    image_size: int = 32
    target_azimuths: int = 8  # per elevation, 360 / n apart, the first at the first input's azimuth
    target_elevations: List[float] = dataclasses.field(default_factory=lambda: [0.0, 30.0])
    target_fovy_deg: float = 40.0
    target_relative_distance: float = 0.75  # camera distance * tan(fovy / 2): the object fills ~0.6 of the view
    object_fraction: float = 0.6  # inputs are re-framed so that the object's larger side fills this share
    max_inputs: int = 4
    background: List[float] = dataclasses.field(default_factory=lambda: list(BACKGROUND))
    guidance_scale: float = 2.0
    num_inference_steps: int = 25
    eta: float = 1.0  # stochastic DDIM: deterministic (0) leaves speckle with this tiny model (docs/image-to-3d.md)
    match_input_colours: bool = False  # generated colours snapped to the inputs' palette (generate_views)
    init_mean: Optional[List[float]] = None  # per-channel mean of the targets in [-1, 1] (sampler start)
    stages: List[Dict[str, Any]] = dataclasses.field(default_factory=list)  # per stage: steps, loss, quality
    training_command: str = ""
    description: str = ""

    @property
    def n_targets(self) -> int:
        return self.target_azimuths * len(self.target_elevations)


def unet_config(image_size: int = 32, n_targets: int = 16, block_out_channels: Sequence[int] = (32, 64, 64)) -> Dict[str, Any]:
    """UNet2DConditionModel config: RGBA + mask in, RGBA out; transformer blocks at the two lower
    resolutions; the target index (0 = condition, 1..n_targets) through ``num_class_embeds``."""
    return {
        "sample_size": image_size,
        "in_channels": CHANNELS + 1,
        "out_channels": CHANNELS,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": list(block_out_channels),
        "layers_per_block": 1,
        "cross_attention_dim": 8,  # no text: one constant zero token
        "attention_head_dim": 2,  # diffusers' legacy name: the number of heads
        "norm_num_groups": 32,
        "num_class_embeds": n_targets + 1,
    }


def joined_attention(name: str) -> bool:
    """Where attn1 joins all frames of a sample: every transformer block (all sit at the lower resolutions)."""
    return name.endswith("attn1.processor")


def zero_init_global_attention(unet: UNet2DConditionModel) -> None:
    """Zero the output projection of every joined attn1, so global attention starts as the identity."""
    for name, module in unet.named_modules():
        if name.endswith("attn1") and joined_attention(name + ".processor"):
            nn.init.zeros_(module.to_out[0].weight)
            nn.init.zeros_(module.to_out[0].bias)


def target_cameras(meta: ImageToViewsMetadata, first_azimuth: float = 0.0) -> Dict[str, Tensor]:
    """The canonical target cameras (n_targets,): for each elevation, ``target_azimuths`` views from
    ``first_azimuth`` (the first input's azimuth) on. Keys as :func:`~threestudio_mv.utils.camera.view_group`."""
    groups = [
        view_group(meta.target_azimuths, elevation, first_azimuth, meta.target_fovy_deg, meta.target_relative_distance)
        for elevation in meta.target_elevations
    ]
    return {key: torch.cat([group[key] for group in groups]) for key in groups[0]}


class ImageToViewsModel(nn.Module):
    """The UNet (with global attention installed), its noise schedule and :class:`ImageToViewsMetadata`."""

    def __init__(self, unet: UNet2DConditionModel, scheduler_config: Dict[str, Any], metadata: ImageToViewsMetadata) -> None:
        super().__init__()
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)
        self.metadata = metadata
        self.set_global_attention(True)

    @classmethod
    def create(cls, metadata: Optional[ImageToViewsMetadata] = None, prediction_type: str = "epsilon") -> "ImageToViewsModel":
        """A randomly initialised model (global attention's output projections at zero)."""
        metadata = metadata or ImageToViewsMetadata()
        unet = UNet2DConditionModel(**unet_config(metadata.image_size, metadata.n_targets))
        zero_init_global_attention(unet)
        return cls(unet, dict(sd_scheduler_config(), prediction_type=prediction_type), metadata)

    def set_global_attention(self, enabled: bool) -> None:
        """Global attention over all frames (True), or per-view attention everywhere (the ablation:
        the targets then see neither the inputs nor each other)."""
        processors = multiview_processors(self.unet, joined=joined_attention) if enabled else per_view_processors(self.unet)
        self.unet.set_attn_processor(processors)

    def forward(self, sample: Tensor, timesteps: Tensor, is_reference: Tensor, target_index: Tensor, num_views: int) -> Tensor:
        """Model output (eps or v, as the scheduler says) for ``sample`` (B*F, 4, H, W): per frame
        ``timesteps``, ``is_reference`` (the mask channel) and ``target_index`` (B*F,)."""
        mask = is_reference.to(sample.dtype).view(-1, 1, 1, 1).expand(-1, 1, *sample.shape[-2:])
        context = torch.zeros(sample.shape[0], 1, self.unet.config.cross_attention_dim, dtype=sample.dtype, device=sample.device)
        return self.unet(
            torch.cat([sample, mask], dim=1), timesteps, context, class_labels=target_index,
            cross_attention_kwargs={"num_views": num_views},
        ).sample

    # -- folders -------------------------------------------------------------------------------
    def save_pretrained(self, directory: Path) -> Path:
        """Write the model folder atomically (float16 UNet weights; loading casts back)."""
        return write_model_folder(directory, type(self).__name__, self.unet, self.metadata, self.scheduler_config)

    @classmethod
    def from_pretrained(cls, directory: Optional[Path] = None) -> "ImageToViewsModel":
        """Load a model folder (default: the bundled i2mv-tiny). A UserError names what is missing."""
        folder = open_model_folder(directory, DEFAULT_I2MV_MODEL, "image-to-views", [SCHEDULER_CONFIG])
        unet = load_folder_unet(folder, UNet2DConditionModel)
        return cls(unet, load_scheduler_config(folder), read_folder_metadata(folder, ImageToViewsMetadata)).eval()


def frame_layout(n_inputs: int, target_ids: Sequence[int], groups: int = 1) -> Tuple[Tensor, Tensor]:
    """``is_reference`` and ``target_index`` (groups * F,) for samples of ``n_inputs`` conditions
    followed by the targets ``target_ids`` (0-based indices into the 16 canonical targets)."""
    is_reference = torch.tensor([True] * n_inputs + [False] * len(target_ids)).repeat(groups)
    index = torch.tensor([0] * n_inputs + [int(i) + 1 for i in target_ids]).repeat(groups)
    return is_reference, index


def to_model_space(rgba: Tensor, background: Sequence[float]) -> Tensor:
    """Premultiplied RGBA (N, H, W, 4) in [0, 1] -> (N, 4, H, W) in [-1, 1]: RGB over ``background``, alpha."""
    alpha = rgba[..., 3:]
    rgb = rgba[..., :3] + torch.tensor(background, dtype=rgba.dtype) * (1.0 - alpha)
    return torch.cat([rgb, alpha], dim=-1).permute(0, 3, 1, 2) * 2.0 - 1.0


@torch.no_grad()
def sample_views(
    model: ImageToViewsModel,
    conditions: Tensor,
    generator: Optional[torch.Generator] = None,
    num_inference_steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    eta: Optional[float] = None,
    progress: bool = False,
) -> Tensor:
    """The 16 target views of one object from ``conditions`` (K, 4, H, W) in model space (see
    :func:`to_model_space`), all 16 jointly in one sample. Classifier-free guidance: the
    unconditional branch is the targets alone. Returns (16, 4, H, W) RGBA in [0, 1]."""
    meta = model.metadata
    n_inputs, n_targets = conditions.shape[0], meta.n_targets
    is_reference, index = frame_layout(n_inputs, range(n_targets))
    frames = n_inputs + n_targets
    scale = meta.guidance_scale if guidance_scale is None else guidance_scale
    references = torch.zeros(frames, CHANNELS, meta.image_size, meta.image_size)
    references[:n_inputs] = conditions

    def predict(sample: Tensor, timestep: Tensor) -> Tensor:
        timesteps = torch.where(is_reference, torch.zeros((), dtype=torch.long), timestep.long())
        cond = model(sample, timesteps, is_reference, index, frames)
        if scale == 1.0:
            return cond
        targets = sample[n_inputs:]
        uncond = model(targets, timesteps[n_inputs:], is_reference[n_inputs:], index[n_inputs:], n_targets)
        guided = cond.clone()
        guided[n_inputs:] = uncond + scale * (cond[n_inputs:] - uncond)
        return guided

    background = torch.tensor(list(meta.background) + [0.0]) * 2.0 - 1.0
    out = ddim_sample(
        predict, references.shape, model.scheduler_config, num_inference_steps or meta.num_inference_steps,
        eta=meta.eta if eta is None else eta, generator=generator, init_mean=meta.init_mean,
        references=references, is_reference=is_reference, x0_transform=partial(anchor_background, background=background),
        progress=progress, desc="views",
    )
    return ((out[n_inputs:] + 1.0) / 2.0).clamp(0.0, 1.0)


def generate_views(
    model: ImageToViewsModel, inputs: Tensor, seed: int = 0, global_attention: bool = True,
    match_colours: Optional[bool] = None, **kwargs: Any
) -> Tensor:
    """16 views (16, 4, S, S) RGBA in [0, 1] from input images ``inputs`` (K, S, S, 4) premultiplied
    (as :func:`~threestudio_mv.data.foreground.load_object_image` gives them). ``global_attention=False``
    is the ablation. ``match_colours`` (default: the model's ``match_input_colours``): every generated
    pixel's colour becomes the nearest colour the inputs show (:func:`match_palette`); not in
    MVDiffusion++: the tiny model's views carry speckle and casts of colours the object does not
    have (docs/image-to-3d.md). ``kwargs`` go to :func:`sample_views`."""
    meta = model.metadata
    if not 1 <= inputs.shape[0] <= meta.max_inputs:
        raise UserError(f"{inputs.shape[0]} input images given; this model takes 1 to {meta.max_inputs}")
    model.set_global_attention(global_attention)
    try:
        views = sample_views(model, to_model_space(inputs, meta.background), torch.Generator().manual_seed(seed), **kwargs)
    finally:
        model.set_global_attention(True)
    if meta.match_input_colours if match_colours is None else match_colours:
        alpha = inputs[..., 3:].permute(0, 3, 1, 2)
        palette = colour_palette(inputs[..., :3].permute(0, 3, 1, 2) / alpha.clamp_min(1e-3), alpha)
        views[:, :3] = match_palette(views[:, :3], views[:, 3:], palette, meta.background)
    return views


def straight_rgba(views: Tensor, background: Sequence[float]) -> Tensor:
    """Model views (N, 4, H, W) (RGB over ``background``, alpha) -> straight-alpha RGBA (N, H, W, 4),
    the colour un-composited where alpha > 0 (what a PNG with alpha holds)."""
    alpha = views[:, 3:]
    return torch.cat([uncomposite(views[:, :3], alpha, background), alpha], dim=1).permute(0, 2, 3, 1)


def write_views(out: Path, views: Tensor, inputs: Tensor, meta: ImageToViewsMetadata) -> Path:
    """Write ``view_<i>.png`` (RGBA), ``transforms.json`` (the procedural renders' format: cameras in
    the frame where the first input is seen from azimuth 0, z up, with the renderer's light) and
    ``views.png`` (inputs | generated, one row per elevation). Returns ``out``."""
    from threestudio_mv.utils.camera import CameraLight

    cameras = target_cameras(meta, 0.0)
    light = CameraLight()
    frames = []
    for i, view in enumerate(straight_rgba(views, meta.background)):
        name = f"view_{i:02d}.png"
        save_image(out / name, view)
        frames.append({
            "file_path": name, "transform_matrix": cameras["c2w"][i].tolist(), "elevation": float(cameras["elevation"][i]),
            "azimuth": float(cameras["azimuth"][i]), "fovy": float(cameras["fovy"][i]),
            "camera_distance": float(cameras["camera_distances"][i]),
        })
    save_json(out / "transforms.json", {
        "camera_angle_x": math.radians(meta.target_fovy_deg), "w": meta.image_size, "h": meta.image_size,
        "convention": "transform_matrix is camera-to-world; OpenGL camera axes (x right, y up, looking down -z); "
        "columns right, up, back, position; world z up; the first input image is seen from azimuth 0 (+x); "
        "elevations absolute; angles in degrees",
        "rgb": "RGBA PNG, straight alpha, generated over white",
        "light": {"direction_camera": list(light.direction_camera), "ambient_ratio": light.ambient_ratio},
        "inputs": int(inputs.shape[0]),
        "frames": frames,
    })
    back = torch.tensor(meta.background)
    over = lambda rgba: rgba[..., :3] + back * (1.0 - rgba[..., 3:])  # noqa: E731 (premultiplied -> over background)
    blank = torch.ones(meta.image_size, meta.image_size, 3)
    shown = [over(image) for image in inputs]
    per_row = meta.target_azimuths
    rows = []
    for r in range(len(meta.target_elevations)):
        left = shown if r == 0 else []
        left = left + [blank] * (max(len(shown), 1) - len(left))
        rows.append(left + [blank] + [v[:3].permute(1, 2, 0) for v in views[r * per_row : (r + 1) * per_row]])
    save_image(out / "views.png", image_grid(rows))
    return out


# ------------------------------------------------------------------------------------------- data
def random_input_cameras(count: int, generator: torch.Generator, one_fovy: bool = False) -> Dict[str, Tensor]:
    """``count`` random input cameras over the training renders' ranges: elevation, FOV (one for all
    with ``one_fovy``) and relative distance uniform, each view its own; azimuth uniform in [-180, 180)."""

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(count, generator=generator)

    elevation, fovy = uniform(*ELEVATION_RANGE), uniform(*FOVY_RANGE)
    if one_fovy:
        fovy = fovy[:1].expand(count).clone()
    distance = distance_for_fovy(uniform(*RELATIVE_DISTANCE_RANGE), fovy)
    azimuth = uniform(-180.0, 180.0)
    return {"elevation": elevation, "azimuth": azimuth, "fovy": fovy, "camera_distances": distance,
            "c2w": c2w_from_spherical(elevation, azimuth, distance)}


def render_inputs(asset: Any, cameras: Dict[str, Tensor], meta: ImageToViewsMetadata, render_size: int = 64) -> Tensor:
    """Input images of ``asset`` at ``cameras``, re-framed as user inputs are: premultiplied RGBA
    (K, S, S, 4) in [0, 1]."""
    out = render_views(asset, cameras["c2w"], cameras["fovy"], render_size, background=tuple(meta.background))
    rgba = torch.cat([out["rgb_fg"], out["alpha"][..., None]], dim=-1).numpy()
    return torch.stack([frame_image(image, meta.image_size, True, meta.object_fraction) for image in rgba])


def render_targets(asset: Any, meta: ImageToViewsMetadata, first_azimuth: float, target_ids: Optional[Sequence[int]] = None) -> Tensor:
    """Ground-truth target views (premultiplied RGBA (T, S, S, 4) in [0, 1]) of ``asset`` seen from
    the canonical cameras aligned with an input at ``first_azimuth``."""
    cameras = target_cameras(meta, first_azimuth)
    ids = list(range(meta.n_targets)) if target_ids is None else list(target_ids)
    out = render_views(asset, cameras["c2w"][ids], cameras["fovy"][ids], meta.image_size, background=tuple(meta.background))
    return torch.cat([out["rgb_fg"] * out["alpha"][..., None], out["alpha"][..., None]], dim=-1)


def stretch_factors(stretch: float, generator: torch.Generator) -> Tensor:
    """Per-axis scales (3,) for :meth:`Asset.stretched`: with probability 1/2 each axis is shortened by up
    to ``stretch`` (uniform), the longest kept at 1 so the object still fills the canonical box; else
    (1, 1, 1). Shape variety beyond the procedural templates, for inputs of shapes never seen."""
    draws = torch.rand(4, generator=generator)
    if stretch <= 0.0 or draws[0] < 0.5:
        return torch.ones(3)
    scale = 1.0 - stretch * draws[1:]
    return scale / scale.max()


def random_colours(parts: Sequence[str], generator: torch.Generator) -> Dict[str, str]:
    """Named colours for ``parts``: half the time one colour for all, else each part its own."""
    draw = lambda: COLOUR_NAMES[int(torch.randint(len(COLOUR_NAMES), (1,), generator=generator))]  # noqa: E731
    if float(torch.rand(1, generator=generator)) < 0.5:
        colour = draw()
        return {part: colour for part in parts}
    return {part: draw() for part in parts}


def training_batch(
    captions: Sequence[str], n_inputs: int, n_train_targets: int, meta: ImageToViewsMetadata, generator: torch.Generator,
    stretch: float = 0.0, recolour: float = 0.0,
) -> Dict[str, Any]:
    """One training step's frames: per caption ``n_inputs`` conditions at random poses, then a random
    subset of ``n_train_targets`` of the targets (view dropout). ``stretch`` > 0: each object may be
    stretched (:func:`stretch_factors`); ``recolour``: the share of objects given random colours
    (:func:`random_colours`: shape learnt apart from the colours its captions pair it with). ``clean``
    (B*F, 4, S, S) in [-1, 1], ``is_reference``, ``target_index`` (B*F,) and ``num_views`` F."""
    frames, refs, indices = [], [], []
    for caption in captions:
        asset = parse_caption(caption)
        if stretch > 0.0:
            asset = asset.stretched(stretch_factors(stretch, generator).tolist())
        if recolour > 0.0 and float(torch.rand(1, generator=generator)) < recolour:
            asset = asset.recoloured(random_colours(asset.parts, generator))
        cameras = random_input_cameras(max(1, n_inputs), generator)
        ids = torch.randperm(meta.n_targets, generator=generator)[:n_train_targets].tolist()
        parts = [render_targets(asset, meta, float(cameras["azimuth"][0]), ids)]
        if n_inputs:
            parts.insert(0, render_inputs(asset, {k: v[:n_inputs] for k, v in cameras.items()}, meta))
        frames.append(to_model_space(torch.cat(parts), meta.background))
        is_reference, index = frame_layout(n_inputs, ids)
        refs.append(is_reference)
        indices.append(index)
    return {"clean": torch.cat(frames), "is_reference": torch.cat(refs), "target_index": torch.cat(indices),
            "num_views": n_inputs + n_train_targets}


# ------------------------------------------------------------------------------------------- quality
def rgba_view_scores(pred: Tensor, truth: Tensor, background: Sequence[float]) -> Dict[str, float]:
    """:func:`threestudio_mv.eval.metrics.view_scores` of generated RGBA views (N, 4, H, W) in [0, 1]
    (straight RGB over the background) against premultiplied true renders (N, H, W, 4)."""
    from threestudio_mv.eval.metrics import view_scores

    back = torch.tensor(background, dtype=torch.float32)
    truth_rgb = truth[..., :3] + back * (1.0 - truth[..., 3:])
    pred_hwc = pred.permute(0, 2, 3, 1)
    return view_scores(pred_hwc[..., :3], pred_hwc[..., 3], truth_rgb, truth[..., 3])


def quick_quality(model: ImageToViewsModel, out: Path, count: int = 4, seed: int = 1234) -> Dict[str, float]:
    """Views of ``count`` held-out assets from one random input each vs their true renders: mean
    scores; writes ``out/quality.png`` (per asset: input | 16 generated over 16 true)."""
    meta = model.metadata
    captions = vocabulary("heldout")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(captions), generator=generator)[:count].tolist()
    scores, rows = [], []
    model.eval()
    for pick in picks:
        asset = parse_caption(captions[pick])
        cameras = random_input_cameras(1, generator)
        inputs = render_inputs(asset, cameras, meta)
        truth = render_targets(asset, meta, float(cameras["azimuth"][0]))
        views = sample_views(model, to_model_space(inputs, meta.background), generator=generator)
        scores.append(rgba_view_scores(views, truth, meta.background))
        back = torch.tensor(meta.background)
        over = lambda rgba: rgba[..., :3] + back * (1.0 - rgba[..., 3:])  # noqa: E731 (premultiplied -> over background)
        rows.append([over(inputs[0])] + [v[:3].permute(1, 2, 0) for v in views])
        rows.append([torch.ones_like(over(inputs[0]))] + [over(t) for t in truth])
    save_image(out / "quality.png", image_grid(rows))
    return {key: float(np.nanmean([s[key] for s in scores])) for key in scores[0]}


# ------------------------------------------------------------------------------------------- training
@dataclasses.dataclass
class TrainConfig:
    """One training stage (see the module docstring)."""

    stage: str  # eps1, v1 or vmix
    out: Path  # run folder: ckpt.pt, log.csv, model/, quality.png
    steps: int
    init: Optional[Path] = None  # v1 / vmix: the previous stage's model folder
    objects_per_step: int = 4
    train_targets: int = 4  # view dropout: targets trained per object per step
    lr: float = 5e-4
    warmup: int = 100
    ema_decay: float = 0.995
    cond_drop: float = 0.1
    ckpt_every: int = 100
    quality_assets: int = 4
    seed: int = 0
    command: str = ""
    device: str = "cpu"  # where the UNet trains; the data is rendered on the CPU
    workers: int = 0  # >0: render the batches in that many DataLoader processes (feeds a GPU; not bit-reproducible on resume)
    stretch: float = 0.0  # >0: half the objects shortened along random axes by up to this share (stretch_factors)
    recolour: float = 0.0  # share of the objects given random named colours (random_colours)


def _target_mean(meta: ImageToViewsMetadata, generator: torch.Generator, count: int = 32) -> List[float]:
    """Per-channel mean of target views in model space (the sampler's start, metadata ``init_mean``)."""
    captions = vocabulary("train")
    batch = training_batch([captions[i] for i in torch.randint(0, len(captions), (count,), generator=generator)], 0, 4, meta, generator)
    return [float(v) for v in batch["clean"].mean(dim=(0, 2, 3))]


def _stage_inputs(stage: str, max_inputs: int, rng: random.Random) -> int:
    """Condition views of one step: 1, or for ``vmix`` half the steps 2..max_inputs."""
    if stage == "vmix" and rng.random() < 0.5:
        return rng.randint(2, max_inputs)
    return 1


def _draw_batch(cfg: TrainConfig, meta: ImageToViewsMetadata, captions: Sequence[str], rng: random.Random,
                generator: torch.Generator) -> Dict[str, Any]:
    """One step's training batch: condition count (0 for the CFG dropout), objects, renders."""
    n_inputs = 0 if rng.random() < cfg.cond_drop else _stage_inputs(cfg.stage, meta.max_inputs, rng)
    picked = [captions[rng.randrange(len(captions))] for _ in range(cfg.objects_per_step)]
    return training_batch(picked, n_inputs, cfg.train_targets, meta, generator, cfg.stretch, cfg.recolour)


class _RenderedBatches(IterableDataset):
    """Endless training batches rendered in DataLoader worker processes, each its own random stream
    (seeded by the run's seed, the step it started at and the worker): on a GPU one core rendering
    the procedural assets would starve the UNet."""

    def __init__(self, cfg: TrainConfig, meta: ImageToViewsMetadata, start_step: int) -> None:
        self.cfg, self.meta, self.start_step = cfg, meta, start_step

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        seed = hash((self.cfg.seed, self.start_step, info.id if info else 0)) % (2**31)
        torch.set_num_threads(1)
        rng, generator, captions = random.Random(seed), torch.Generator().manual_seed(seed), vocabulary("train")
        while True:
            yield _draw_batch(self.cfg, self.meta, captions, rng, generator)


def _build(cfg: TrainConfig) -> ImageToViewsModel:
    if cfg.stage not in STAGES:
        raise UserError(f"unknown stage '{cfg.stage}'; use {', '.join(STAGES)}")
    if cfg.stage == "eps1":
        meta = ImageToViewsMetadata()
        meta.init_mean = _target_mean(meta, torch.Generator().manual_seed(cfg.seed + 1))
        return ImageToViewsModel.create(meta, STAGES[cfg.stage])
    if cfg.init is None:
        raise UserError(f"stage {cfg.stage} needs --init, the previous stage's model folder")
    model = ImageToViewsModel.from_pretrained(cfg.init)
    model.scheduler_config["prediction_type"] = STAGES[cfg.stage]
    return model


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) one stage; returns the exported model folder ``<out>/model`` (EMA weights)."""
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model = _build(cfg).to(device).train()
    previous = model.metadata.training_command
    model.metadata.training_command = f"{previous} && {cfg.command}" if previous and cfg.stage != "eps1" else cfg.command
    run = TrainingRun(model.unet, cfg.out, cfg.steps, cfg.lr, cfg.warmup, cfg.ema_decay, cfg.ckpt_every, cfg.seed,
                      desc=f"train {cfg.stage}", extra={"init_mean": model.metadata.init_mean})
    meta = model.metadata
    meta.init_mean = run.extra["init_mean"]  # eps1 computes it once; a resumed run keeps the first one
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    captions = vocabulary("train")
    rng, generator = run.rng, run.generator
    if cfg.workers > 0:
        loader = iter(DataLoader(_RenderedBatches(cfg, meta, run.step_count), batch_size=None, num_workers=cfg.workers,
                                 prefetch_factor=4))
        next_batch = lambda: next(loader)  # noqa: E731
    else:
        next_batch = lambda: _draw_batch(cfg, meta, captions, rng, generator)  # noqa: E731

    def export() -> Path:
        with run.ema_weights():
            return model.save_pretrained(cfg.out / "model")

    while not run.done:
        batch = next_batch()
        clean, is_reference, frames = batch["clean"].to(device), batch["is_reference"].to(device), batch["num_views"]
        noise = torch.randn(clean.shape, generator=generator).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.objects_per_step,), generator=generator).to(device)
        timesteps = torch.where(is_reference, torch.zeros((), dtype=torch.long, device=device), t.repeat_interleave(frames))
        noisy = noise_targets(scheduler, clean, noise, timesteps, is_reference)
        prediction = model(noisy, timesteps, is_reference, batch["target_index"].to(device), frames)
        if run.step(target_loss(prediction, training_target(scheduler, clean, noise, timesteps), is_reference)):
            export()
    run.close()
    model.to("cpu")  # the quality check samples on the CPU, as users do
    # The stage's summary: mean loss of its last ~500 steps and a quick quality check of the EMA weights.
    recent = run.logged_losses()[-max(1, 500 // cfg.ckpt_every):]
    with run.ema_weights():
        quality = quick_quality(model, cfg.out, cfg.quality_assets) if cfg.quality_assets > 0 else {}
        meta.stages = [s for s in meta.stages if s.get("stage") != cfg.stage] + [
            {"stage": cfg.stage, "prediction_type": STAGES[cfg.stage], "steps": cfg.steps,
             "loss": float(np.mean(recent)) if recent else None, "quality_1_input": quality}
        ]
        folder = model.save_pretrained(cfg.out / "model")
    save_json(cfg.out / "done.json", {"stage": cfg.stage, "steps": cfg.steps, "command": cfg.command, "quality": quality})
    print(f"stage {cfg.stage}: loss {meta.stages[-1]['loss']}, quality {quality}")
    return folder


def train_main(argv: List[str]) -> None:
    """``python -m threestudio_mv.i2mv train --stage eps1|v1|vmix --out DIR --steps N [--init MODEL] [...]``"""
    parser = argparse.ArgumentParser(prog="python -m threestudio_mv.i2mv train", description=train_main.__doc__)
    parser.add_argument("--stage", required=True, choices=list(STAGES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", required=True, type=int)
    parser.add_argument("--init", type=Path, default=None, help="v1 / vmix: the previous stage's model folder")
    parser.add_argument("--objects-per-step", type=int, default=4)
    parser.add_argument("--train-targets", type=int, default=4, help="view dropout: targets trained per object per step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ckpt-every", type=int, default=100)
    parser.add_argument("--quality-assets", type=int, default=4, help="held-out assets of the end-of-stage check (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the UNet trains, e.g. cuda")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes rendering the batches (for a GPU)")
    parser.add_argument("--stretch", type=float, default=0.0,
                        help="shape variety: half the objects shortened along random axes by up to this share (0..0.9)")
    parser.add_argument("--recolour", type=float, default=0.0, help="share of the objects given random colours (0..1)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.stretch <= 0.9:
        raise UserError(f"--stretch must be in 0..0.9, got {args.stretch}")
    if not 0.0 <= args.recolour <= 1.0:
        raise UserError(f"--recolour must be in 0..1, got {args.recolour}")
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if not 1 <= args.train_targets <= 16:
        raise UserError(f"--train-targets must be in 1..16, got {args.train_targets}")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        stage=args.stage, out=args.out, steps=args.steps, init=args.init, objects_per_step=args.objects_per_step,
        train_targets=args.train_targets, lr=args.lr, ckpt_every=args.ckpt_every, quality_assets=args.quality_assets,
        seed=args.seed, command="python -m threestudio_mv.i2mv train " + " ".join(argv), device=args.device,
        workers=args.workers, stretch=args.stretch, recolour=args.recolour,
    )
    print(train(cfg))
