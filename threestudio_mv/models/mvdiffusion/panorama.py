"""The text-to-panorama model (MVDiffusion at toy scale): a base UNet + CAA blocks, its folder, its
sampler and its two-stage training.

Model folder (diffusers layout)::

    model_index.json                 class, components, metadata (image size, views, FOV, sampler)
    unet/config.json, unet/diffusion_pytorch_model.safetensors      the single-view base UNet (float16)
    caa/config.json, caa/diffusion_pytorch_model.safetensors        the CAA blocks
    scheduler/scheduler_config.json
    text_encoder/spec.json           the frozen sentence encoder it was trained with

The base UNet (pixel space) takes 3 + 1 + 3 input channels: the noisy view, a mask (1 = this view is
given) and the masked image (the given view, or zeros). Text-to-panorama feeds mask 0 and zeros;
outpainting gives view 0. The base UNet loads alone with ``UNet2DConditionModel.from_pretrained``.

Training (``python -m threestudio_mv.panorama train``), as the paper: stage ``base`` trains the UNet
alone on single room views (random yaw; 15 % of the views given, to teach the mask channels); stage
``caa`` freezes it and trains only the CAA blocks on 8-view sets (random theta0; half of the sets
outpainting, view 0 given and no loss on it). Both: epsilon loss, 10 % empty prompts for
classifier-free guidance, AdamW, EMA of the trained weights, atomic checkpoints every
``--ckpt-every`` steps and resume from the last one.
"""
import argparse
import dataclasses
import json
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn

from threestudio_mv.data.procedural import rooms
from threestudio_mv.models.mvdiffusion.caa import CAAUNet
from threestudio_mv.models.mvdiffusion.cfg import predict_noise_with_cfg
from threestudio_mv.models.mvdiffusion.folder import (
    SCHEDULER_CONFIG,
    load_folder_unet,
    load_scheduler_config,
    open_model_folder,
    read_folder_metadata,
    write_model_folder,
)
from threestudio_mv.models.mvdiffusion.model import sd_scheduler_config
from threestudio_mv.models.mvdiffusion.sampler import ddim_sample
from threestudio_mv.models.mvdiffusion.text_encoders import TextEncoder, build_text_encoder
from threestudio_mv.models.mvdiffusion.training import TrainingRun
from threestudio_mv.models.prompt_processors.cache import CachedTextEncoder
from threestudio_mv.utils import camera
from threestudio_mv.utils.errors import UserError
from threestudio_mv.utils.io import save_json
from threestudio_mv.utils.trainer import warmup_cosine_factor

DEFAULT_PANORAMA_MODEL = Path(__file__).resolve().parents[2] / "assets" / "panorama-tiny"
TEXT_ENCODER_SPEC = "text_encoder/spec.json"
SAMPLE_CHANNELS = 3
GIVEN_CHANNELS = 1 + 3  # mask + masked image


@dataclasses.dataclass
class PanoramaMetadata:
    """What a user of the model needs besides the weights."""

    image_size: int = 32
    n_view: int = 8
    fov_deg: float = 90.0
    guidance_scale: float = 3.0
    num_inference_steps: int = 20
    eta: float = 0.0
    caa_min_stride: int = 2  # CAA at feature strides >= this (2: not at the full-resolution level)
    init_mean: Optional[List[float]] = None  # per-channel pixel mean in [-1, 1] (sampler start)
    fuse_overlaps: bool = True  # sampler default: fuse each step's x0 where views overlap (OverlapFusion)
    training_command: str = ""
    description: str = ""


def base_unet_config(image_size: int = 32, cross_attention_dim: int = 384) -> Dict[str, Any]:
    """The single-view base UNet: 3 + 1 + 3 input channels, channels 32/64/64, text cross-attention
    at the two lower resolutions."""
    return {
        "sample_size": image_size,
        "in_channels": SAMPLE_CHANNELS + GIVEN_CHANNELS,
        "out_channels": SAMPLE_CHANNELS,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 2,
        "norm_num_groups": 32,
    }


class PanoramaModel(nn.Module):
    """Base UNet + CAA blocks (:class:`~threestudio_mv.models.mvdiffusion.caa.CAAUNet`), noise
    schedule, text-encoder spec and :class:`PanoramaMetadata`."""

    def __init__(self, net: CAAUNet, scheduler_config: Dict[str, Any], text_encoder_spec: Dict[str, Any], metadata: PanoramaMetadata) -> None:
        super().__init__()
        self.net = net
        self.scheduler_config = dict(scheduler_config)
        self.text_encoder_spec = dict(text_encoder_spec)
        self.metadata = metadata

    @classmethod
    def create(cls, text_encoder_spec: Dict[str, Any], text_dim: int, metadata: Optional[PanoramaMetadata] = None) -> "PanoramaModel":
        """A randomly initialised model (fresh CAA blocks are the identity)."""
        metadata = metadata or PanoramaMetadata()
        unet = UNet2DConditionModel(**base_unet_config(metadata.image_size, text_dim))
        net = CAAUNet(unet, metadata.fov_deg, metadata.n_view, min_stride=metadata.caa_min_stride)
        return cls(net, sd_scheduler_config(), text_encoder_spec, metadata)

    def build_text_encoder(self) -> TextEncoder:
        return build_text_encoder(self.text_encoder_spec)

    def predict_noise(self, sample: Tensor, timestep: Tensor, text: Tensor, given: Tensor, num_views: int) -> Tensor:
        """Epsilon for ``sample`` (B*V, 3, H, W) with ``given`` (B*V, 4, H, W) = [mask, masked image].

        The argument order is the multi-view model's (the condition in its camera slot), so the shared
        CFG helper :func:`~threestudio_mv.models.mvdiffusion.cfg.predict_noise_with_cfg` drives both."""
        return self.net(torch.cat([sample, given], dim=1), timestep, text, num_views)

    # -- folders -------------------------------------------------------------------------------
    def save_pretrained(self, directory: Path) -> Path:
        """Write the model folder atomically (float16 UNet: it halves the shipped folder)."""

        def write_caa_and_text_encoder(tmp: Path) -> None:
            self.net.save_caa(tmp / "caa")
            (tmp / "text_encoder").mkdir()
            (tmp / TEXT_ENCODER_SPEC).write_text(json.dumps(self.text_encoder_spec, indent=2) + "\n")

        components = {"caa": ["threestudio_mv.models.mvdiffusion.caa", "CAAUNet"], "text_encoder": self.text_encoder_spec.get("type")}
        return write_model_folder(directory, type(self).__name__, self.net.unet, self.metadata, self.scheduler_config,
                                  components, write_caa_and_text_encoder)

    @classmethod
    def from_pretrained(cls, directory: Optional[Path] = None) -> "PanoramaModel":
        """Load a model folder (default: the bundled panorama-tiny). A UserError names what is missing."""
        folder = open_model_folder(directory, DEFAULT_PANORAMA_MODEL, "panorama", ["caa/config.json", SCHEDULER_CONFIG, TEXT_ENCODER_SPEC])
        net = CAAUNet.from_folders(load_folder_unet(folder, UNet2DConditionModel), folder / "caa")
        spec = json.loads((folder / TEXT_ENCODER_SPEC).read_text())
        return cls(net, load_scheduler_config(folder), spec, read_folder_metadata(folder, PanoramaMetadata)).eval()


def given_channels(images: Optional[Tensor], batch: int, size: int, n_view: int) -> Tensor:
    """[mask, masked image] (batch, 4, size, size): zeros, or view 0 of every panorama given by
    ``images`` ((batch / n_view, 3, size, size) in [-1, 1])."""
    given = torch.zeros(batch, GIVEN_CHANNELS, size, size)
    if images is not None:
        given[::n_view, 0] = 1.0
        given[::n_view, 1:] = images
    return given


@torch.no_grad()
def sample_panorama(
    model: PanoramaModel,
    cond: Tensor,
    uncond: Tensor,
    given_view: Optional[Tensor] = None,
    use_caa: bool = True,
    fuse_overlaps: Optional[bool] = None,
    num_inference_steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    eta: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
) -> Tensor:
    """The 8 views of G panoramas: ``cond`` (G, L, D) text embeddings, ``uncond`` (1, L, D).

    ``given_view`` (G, 3, H, W) in [0, 1] outpaints around view 0: it enters the mask channels, and
    after every DDIM step view 0 of the sample is replaced by the given view noised to the next
    timestep (re-imposed; exactly the given view at the end). ``use_caa=False`` runs the base model
    alone (views independent). ``fuse_overlaps`` (default: the model's ``metadata.fuse_overlaps``) fuses
    each step's x0 where views overlap (:class:`OverlapFusion`). Returns (G*V, 3, H, W) in [0, 1], the views of a panorama contiguous.
    """
    meta = model.metadata
    n_view, size = meta.n_view, meta.image_size
    groups = cond.shape[0]
    batch = groups * n_view
    scale = meta.guidance_scale if guidance_scale is None else guidance_scale
    known = given_view * 2.0 - 1.0 if given_view is not None else None
    given = given_channels(known, batch, size, n_view)
    references = is_reference = None
    if known is not None:  # view 0 of each panorama, re-imposed noised to each step's timestep
        references = known.repeat_interleave(n_view, dim=0)
        is_reference = torch.arange(batch) % n_view == 0
    cond = cond.repeat_interleave(n_view, dim=0)

    def predict(sample: Tensor, timestep: Tensor) -> Tensor:
        return predict_noise_with_cfg(model, sample, timestep, cond, uncond, given, n_view, scale)[0]

    fuse = meta.fuse_overlaps if fuse_overlaps is None else fuse_overlaps
    fusion = OverlapFusion(camera.panorama_yaws(n_view), meta.fov_deg, size) if fuse else None
    model.net.enabled = use_caa
    try:
        sample = ddim_sample(
            predict, (batch, SAMPLE_CHANNELS, size, size), model.scheduler_config,
            num_inference_steps or meta.num_inference_steps, eta=meta.eta if eta is None else eta,
            generator=generator, init_mean=meta.init_mean, references=references, is_reference=is_reference,
            renoise_references=True, x0_transform=fusion, progress=progress,
        )
    finally:
        model.net.enabled = True
    return ((sample + 1.0) / 2.0).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------- training
@dataclasses.dataclass
class TrainConfig:
    """One training stage (see the module docstring)."""

    stage: str  # "base" or "caa"
    out: Path  # run folder: ckpt.pt, log.csv, model/
    steps: int
    init: Optional[Path] = None  # base: a panorama model folder to continue; caa: a base or panorama model folder
    rooms_per_step: int = 2
    lr: float = 5e-4
    warmup: int = 100
    decay_fraction: float = 0.3  # cosine lr decay over this last fraction of the steps (recomputed on resume)
    ema_decay: float = 0.995
    cond_drop: float = 0.1
    given_prob: float = 0.15  # base: fraction of single views given; caa: fraction of outpainting sets
    ckpt_every: int = 100
    caa_min_stride: int = 2
    seed: int = 0
    command: str = ""


def _text_table(encoder: TextEncoder, cache_dir: Path) -> Dict[str, Tensor]:
    """Embeddings of every training caption and paraphrase, and of the empty prompt."""
    texts = sorted({text for key in rooms.room_keys("train") for text in rooms.caption_choices(key)}) + [""]
    embeddings = CachedTextEncoder(encoder, cache_dir).encode(texts, progress=True)
    return dict(zip(texts, embeddings))


def _pixel_mean(generator: random.Random, count: int = 64) -> List[float]:
    """Per-channel mean of training views in [-1, 1] (the sampler's start, PanoramaMetadata.init_mean)."""
    images = rooms.sample_rooms(count, "train", generator)["images"]
    return [float(v) for v in (images * 2.0 - 1.0).mean(dim=(0, 1, 2))]


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) one stage; returns the exported model folder ``<out>/model``."""
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    encoder = build_text_encoder({"type": "minilm", "max_length": 24})
    table = _text_table(encoder, cfg.out.parent / "text_cache")
    if cfg.stage == "base":
        if cfg.init is not None:
            # Continue a panorama model's base UNet (its CAA blocks are carried along untouched: the caa
            # stage continues them afterwards on the new base).
            model = PanoramaModel.from_pretrained(cfg.init)
        else:
            meta = PanoramaMetadata(init_mean=_pixel_mean(random.Random(cfg.seed + 1)))
            model = PanoramaModel.create(encoder.spec(), encoder.dim, meta)
        trained: nn.Module = model.net.unet
    elif cfg.stage == "caa":
        if cfg.init is None:
            raise UserError("the caa stage needs --init, the base stage's model folder")
        if (cfg.init / "caa").is_dir():
            # A finished panorama model: its CAA blocks train on.
            model = PanoramaModel.from_pretrained(cfg.init)
        else:
            # The base UNet of the base stage, with fresh (identity) CAA blocks at the chosen levels.
            meta = dataclasses.replace(read_folder_metadata(cfg.init, PanoramaMetadata), caa_min_stride=cfg.caa_min_stride)
            unet = UNet2DConditionModel.from_pretrained(str(cfg.init / "unet"), low_cpu_mem_usage=False, torch_dtype=torch.float32)
            net = CAAUNet(unet, meta.fov_deg, meta.n_view, min_stride=meta.caa_min_stride)
            model = PanoramaModel(net, dict(DDPMScheduler.load_config(str(cfg.init / "scheduler"))), encoder.spec(), meta)
        model.net.unet.requires_grad_(False)  # the base stays frozen
        trained = model.net.blocks
    else:
        raise UserError(f"unknown stage '{cfg.stage}'; use base or caa")
    command = f"{model.metadata.training_command} && {cfg.command}" if cfg.init is not None else cfg.command
    model.train()
    decay_start = int(cfg.steps * (1.0 - cfg.decay_fraction))
    run = TrainingRun(
        trained, cfg.out, cfg.steps, cfg.lr, ema_decay=cfg.ema_decay, ckpt_every=cfg.ckpt_every, seed=cfg.seed,
        desc=f"train {cfg.stage}", extra={"metadata": dataclasses.asdict(model.metadata)},
        lr_factor=lambda step: warmup_cosine_factor(step, cfg.warmup, decay_start, cfg.steps, 0.1),
    )
    # A resumed run keeps the metadata it started with (the base stage's init_mean), with this command.
    model.metadata = dataclasses.replace(PanoramaMetadata(**run.extra["metadata"]), training_command=command)
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    rng = run.rng
    n_view, size = model.metadata.n_view, model.metadata.image_size

    def export() -> Path:
        with run.ema_weights():
            return model.save_pretrained(cfg.out / "model")

    while not run.done:
        data = rooms.sample_rooms(cfg.rooms_per_step, "train", rng, size=size, n_view=n_view)
        clean = data["images"].permute(0, 3, 1, 2) * 2.0 - 1.0
        batch = clean.shape[0]
        captions = [rng.choice(rooms.caption_choices(key)) if rng.random() >= cfg.cond_drop else "" for key in data["keys"]]
        text = torch.stack([table[c] for c in captions]).repeat_interleave(n_view, dim=0)
        noise = torch.randn_like(clean)
        given = torch.zeros(batch, GIVEN_CHANNELS, size, size)
        weight = torch.ones(batch)
        if cfg.stage == "base":
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
            chosen = torch.rand(batch) < cfg.given_prob
            given[chosen, 0] = 1.0
            given[chosen, 1:] = clean[chosen]
            num_views = 1
        else:
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.rooms_per_step,)).repeat_interleave(n_view)
            outpaint = (torch.rand(cfg.rooms_per_step) < cfg.given_prob).repeat_interleave(n_view)
            first = torch.arange(batch) % n_view == 0
            given[outpaint & first, 0] = 1.0
            given[outpaint & first, 1:] = clean[outpaint & first]
            weight[outpaint & first] = 0.0  # loss on the targets only
            num_views = n_view
        noisy = scheduler.add_noise(clean, noise, timesteps)
        eps = model.predict_noise(noisy, timesteps, text, given, num_views)
        per_image = F.mse_loss(eps, noise, reduction="none").mean(dim=(1, 2, 3))
        if run.step((per_image * weight).sum() / weight.sum()):
            export()
    run.close()
    folder = export()
    save_json(cfg.out / "done.json", {"stage": cfg.stage, "steps": cfg.steps, "command": cfg.command})
    return folder


def train_main(argv: List[str]) -> None:
    """``python -m threestudio_mv.panorama train --stage base|caa --out DIR --steps N [...]``"""
    parser = argparse.ArgumentParser(prog="python -m threestudio_mv.panorama train", description=train_main.__doc__)
    parser.add_argument("--stage", required=True, choices=["base", "caa"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", required=True, type=int)
    parser.add_argument("--init", type=Path, default=None,
                        help="base: a panorama model folder whose base UNet trains on; caa: the base stage's model folder "
                             "(fresh CAA blocks) or a panorama model folder (its CAA blocks train on)")
    parser.add_argument("--rooms-per-step", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--given-prob", type=float, default=None, help="default: 0.15 (base), 0.5 (caa)")
    parser.add_argument("--ckpt-every", type=int, default=100)
    parser.add_argument("--caa-min-stride", type=int, default=2, help="caa stage: CAA at feature strides >= this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    torch.set_num_threads(args.threads)
    given_prob = args.given_prob if args.given_prob is not None else (0.15 if args.stage == "base" else 0.5)
    command = "python -m threestudio_mv.panorama train " + " ".join(argv)
    cfg = TrainConfig(
        stage=args.stage, out=args.out, steps=args.steps, init=args.init, rooms_per_step=args.rooms_per_step,
        lr=args.lr, given_prob=given_prob, ckpt_every=args.ckpt_every, caa_min_stride=args.caa_min_stride,
        seed=args.seed, command=command,
    )
    print(train(cfg))


# ------------------------------------------------------------------------------------------- stitching
def view_lookup(directions: Tensor, yaws: Tensor, fov_deg: float) -> Tuple[Tensor, Tensor]:
    """Where world ``directions`` (P, 3) fall in level views at ``yaws`` (V,): ``grid`` (V, P, 1, 2) for
    ``grid_sample`` (normalised image coordinates) and the tent ``weight`` (V, P) = (1 - |x|)(1 - |y|)
    (MVDiffusion's blending; 0 outside a view and behind it)."""
    c2w = camera.yaw_c2w(yaws)
    local = torch.einsum("vji,pj->vpi", c2w[:, :3, :3], directions)  # R^T d: camera coordinates
    depth = -local[..., 2]
    tan_half = torch.tan(torch.deg2rad(torch.tensor(fov_deg / 2.0)))
    safe = torch.where(depth > 1e-6, depth, torch.ones_like(depth))
    x, y = local[..., 0] / safe / tan_half, local[..., 1] / safe / tan_half
    weight = ((1.0 - x.abs()).clamp_min(0.0) * (1.0 - y.abs()).clamp_min(0.0)) * (depth > 1e-6)
    return torch.stack([x, -y], dim=-1)[:, :, None, :], weight  # image top = +y


def read_views(views: Tensor, grid: Tensor) -> Tensor:
    """Views (V, C, S, S) read at ``grid`` (V, P, 1, 2) -> (V, C, P), bilinear."""
    return F.grid_sample(views.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[..., 0]


class OverlapFusion:
    """Makes a panorama's views agree where they overlap: each pixel of view i becomes the tent-weighted
    mean of every view at that pixel's world direction, so views that see one direction hold one colour.

    ``sample_panorama(fuse_overlaps=True)`` applies it to every DDIM step's x0 prediction, as
    MultiDiffusion fuses overlapping windows: the model (with CAA) still denoises the views jointly, and
    each step continues from one seamless scene.
    """

    def __init__(self, yaws: Tensor, fov_deg: float, size: int) -> None:
        local = camera.camera_ray_directions(size, size, torch.tensor([fov_deg]))[0].reshape(-1, 3)
        self.lookups = []  # per target view: grid (V, S*S, 1, 2) into every view, normalised weights (V, S*S)
        for rotation in camera.yaw_c2w(yaws)[:, :3, :3]:
            grid, weight = view_lookup(local @ rotation.T, yaws, fov_deg)
            self.lookups.append((grid, weight / weight.sum(dim=0, keepdim=True)))
        self.n_view, self.size = yaws.shape[0], size

    def __call__(self, views: Tensor) -> Tensor:
        """(G*V, C, S, S) views of G panoramas (each panorama's views contiguous) -> the same, fused."""
        fused = []
        for group in views.split(self.n_view):
            for grid, weight in self.lookups:
                colours = read_views(group, grid.to(views.device))  # (V, C, S*S)
                fused.append((colours * weight.to(colours)[:, None]).sum(dim=0).view(-1, self.size, self.size))
        return torch.stack(fused).to(views.dtype)


def stitch_equirect(views: Tensor, yaws: Tensor, fov_deg: float = 90.0, height: int = 64, blend: str = "tent") -> Dict[str, Tensor]:
    """Equirectangular panorama (height, 2 height, 3) of level views (V, 3, S, S) in [0, 1] at ``yaws``.

    ``blend="tent"``: every view is weighted by (1 - |x|)(1 - |y|) in its normalised image coordinates
    (MVDiffusion's tent blending); ``"nearest"``: each pixel from the view that weights it most (hard
    seams, for measuring them). Directions no view sees (near the poles) take the nearest row that
    every column has, averaged over 1/8 of the circle around them (a cap of the ceiling or floor
    colour, not streaks). Returns ``image`` and ``covered`` (height, 2 height) bool.
    """
    width = 2 * height
    grid, weight = view_lookup(camera.equirect_directions(height, width).reshape(-1, 3), yaws, fov_deg)
    if blend == "nearest":
        weight = F.one_hot(weight.argmax(dim=0), views.shape[0]).T.float() * (weight.max(dim=0).values > 0)
    elif blend != "tent":
        raise ValueError(f"unknown blend '{blend}'; use tent or nearest")
    colours = read_views(views, grid)
    total = weight.sum(dim=0)
    image = (colours * weight[:, None]).sum(dim=0) / total.clamp_min(1e-8)  # (3, P)
    image = image.T.reshape(height, width, 3)
    covered = (total > 0).reshape(height, width)
    full = covered.all(dim=1).nonzero()[:, 0]  # rows every column has (the band all views cover)
    rows = torch.arange(height)[:, None].expand(height, width)
    nearest = rows.clamp(int(full.min()), int(full.max()))
    window = width // 8 + 1
    blurred = image.permute(2, 0, 1)[None]
    blurred = F.avg_pool2d(F.pad(blurred, (window // 2, window // 2, 0, 0), mode="circular"), (1, window), stride=1)[0]
    filled = torch.gather(blurred.permute(1, 2, 0), 0, nearest[..., None].expand(-1, -1, 3))
    image = torch.where(covered[..., None], image, filled)
    return {"image": image, "covered": covered}
