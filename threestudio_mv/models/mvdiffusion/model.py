"""The multi-view diffusion model: UNet (+ optional VAE) + noise schedule + text-encoder spec.

A model is one folder in diffusers' layout::

    model_index.json                 class, components and metadata (image size, views, suffix, ...)
    unet/config.json, unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json
    vae/...                          latent-space models only
    text_encoder/spec.json           which encoder the model was trained with
    text_encoder/model.safetensors   learned encoders only
    text_encoder/config.json + weights, tokenizer/   CLIP encoders (copied in: the folder is self-contained)
"""
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from threestudio_mv.models.mvdiffusion.text_encoders import TextEncoder, build_text_encoder
from threestudio_mv.models.mvdiffusion.unet import CAMERA_DIM, build_unet, install_multiview_attention
from threestudio_mv.utils.errors import UserError
from threestudio_mv.utils.io import atomic_directory

PathLike = Union[str, os.PathLike]
#: The small model trained on the procedural dataset and shipped with the package.
DEFAULT_MODEL_PATH = Path(__file__).resolve().parents[2] / "assets" / "mvdream-tiny"
MODEL_INDEX = "model_index.json"
TEXT_ENCODER_SPEC = "text_encoder/spec.json"
TEXT_ENCODER_WEIGHTS = "text_encoder/model.safetensors"
CAMERA_CONVENTION = (
    "z-up world, OpenGL camera; c2w columns right, up, back, position; condition = c2w with unit-length "
    "translation flattened to 16 (threestudio_mv.utils.camera.mvdream_camera_condition); no camera = zeros"
)


def sd_scheduler_config() -> Dict[str, Any]:
    """Stable Diffusion's noise schedule: scaled_linear 0.00085..0.012, 1000 steps, epsilon."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


@dataclasses.dataclass
class ModelMetadata:
    """What a user of the model needs to know besides the weights."""

    image_size: int = 32  # pixels per view side
    n_view: int = 4  # views per object the model was trained with
    prompt_suffix: str = ""  # appended to every prompt (MVDream: ", 3d asset")
    latent: bool = False  # True: works on SD-VAE latents; False: on pixels in [-1, 1]
    camera_convention: str = CAMERA_CONVENTION
    # Cameras the training renders used, so samplers can frame the object the same way.
    default_fovy: float = 40.0
    default_elevation: float = 15.0
    relative_distance: float = 0.92  # distance = relative_distance / tan(fovy / 2)
    guidance_scale: float = 5.0
    num_inference_steps: int = 50
    # DDIM eta: 0 = deterministic DDIM; 1 = fresh noise at every step, as DDPM's ancestral sampler. A small
    # model's errors persist along a deterministic path; the noise lets later steps correct them.
    eta: float = 0.0
    # Per-channel mean of the training samples (pixels in [-1, 1]). Samplers start from the forward
    # process's true marginal N(sqrt(abar_T) * mean, 1 - abar_T) instead of N(0, 1): SD's schedule
    # keeps some signal at t = T (non-zero terminal SNR), and for a small pixel-space model on white
    # backgrounds starting from zero-mean noise leaves random tints on the background. None: N(0, 1).
    init_mean: Optional[List[float]] = None
    # Background colour of the training renders (RGB in [0, 1]; pixel models). Samplers then anchor
    # each step's x0 prediction to it (threestudio_mv.models.mvdiffusion.cfg.anchor_background), which
    # removes the colour cast a small model leaves on the background. None: no anchor.
    background: Optional[List[float]] = None
    description: str = ""


class MultiViewDiffusionModel(nn.Module):
    """UNet with multi-view attention and camera embedding, an optional VAE, the noise schedule,
    the text encoder spec (and a learned encoder's weights) and :class:`ModelMetadata`."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler_config: Dict[str, Any],
        text_encoder_spec: Dict[str, Any],
        metadata: ModelMetadata,
        vae: Optional[AutoencoderKL] = None,
        text_encoder: Optional[TextEncoder] = None,
    ) -> None:
        super().__init__()
        if metadata.latent != (vae is not None):
            raise ValueError("metadata.latent must be True exactly when a VAE is given")
        self.unet = install_multiview_attention(unet)
        self.vae = vae.requires_grad_(False) if vae is not None else None
        self.scheduler_config = dict(scheduler_config)
        self.text_encoder_spec = dict(text_encoder_spec)
        self.metadata = metadata
        # Only trainable (learned) encoders live inside the model; frozen ones are built on demand.
        if text_encoder is None and text_encoder_spec.get("type") == "learned":
            text_encoder = build_text_encoder(text_encoder_spec)  # freshly initialised
        self.text_encoder = text_encoder if text_encoder is not None and text_encoder.trainable else None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        unet_config: Dict[str, Any],
        text_encoder_spec: Dict[str, Any],
        metadata: Optional[ModelMetadata] = None,
        vae: Optional[AutoencoderKL] = None,
        scheduler_config: Optional[Dict[str, Any]] = None,
    ) -> "MultiViewDiffusionModel":
        """A randomly initialised model (a learned text encoder is built from its spec)."""
        metadata = metadata or ModelMetadata(latent=vae is not None)
        return cls(build_unet(unet_config), scheduler_config or sd_scheduler_config(), text_encoder_spec, metadata, vae=vae)

    def build_text_encoder(self) -> TextEncoder:
        """The model's text encoder (the learned one it holds, or a fresh frozen one from the spec)."""
        if self.text_encoder is not None:
            return self.text_encoder
        return build_text_encoder(self.text_encoder_spec)

    def noise_scheduler(self) -> DDPMScheduler:
        """The training noise schedule (diffusers DDPMScheduler)."""
        return DDPMScheduler.from_config(self.scheduler_config)

    def ddim_scheduler(self) -> DDIMScheduler:
        """A DDIM sampler on the same schedule."""
        return DDIMScheduler.from_config(self.scheduler_config)

    # -- running -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def sample_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def sample_size(self) -> int:
        """Side of the UNet's input (pixels, or latents for latent models)."""
        if self.vae is None:
            return self.metadata.image_size
        return self.metadata.image_size // (2 ** (len(self.vae.config.block_out_channels) - 1))

    def predict_noise(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        text_embeddings: torch.Tensor,
        camera: Optional[torch.Tensor],
        num_views: int,
    ) -> torch.Tensor:
        """Epsilon for ``sample`` (B*F, C, h, w) at ``timestep`` (scalar or (B*F,)).

        ``text_embeddings`` (B*F, L, D); ``camera`` (B*F, 16) MVDream camera conditions or None (no
        camera: zeros, as for single images); views of one object are contiguous, F = ``num_views``.
        """
        if sample.shape[0] % num_views != 0:
            raise ValueError(f"batch {sample.shape[0]} is not a multiple of num_views={num_views}")
        if camera is None:
            camera = sample.new_zeros(sample.shape[0], CAMERA_DIM)
        dtype = self.unet.dtype  # the UNet runs in its own dtype (e.g. a float16 pipeline); eps comes back as sample's
        return self.unet(
            sample.to(dtype),
            timestep,
            encoder_hidden_states=text_embeddings.to(dtype),
            class_labels=camera.to(dtype),
            cross_attention_kwargs={"num_views": num_views},
        ).sample.to(sample.dtype)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> UNet samples (pixels as they are, or scaled VAE latents)."""
        if self.vae is None:
            return images
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample() * self.vae.config.scaling_factor

    def decode_samples(self, samples: torch.Tensor) -> torch.Tensor:
        """UNet samples -> images (B, 3, H, W) in [-1, 1]."""
        if self.vae is None:
            return samples
        return self.vae.decode(samples.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    # -- folders -------------------------------------------------------------------------------
    def save_pretrained(self, directory: PathLike) -> Path:
        """Write the model folder atomically (a temporary folder renamed into place)."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            DDPMScheduler.from_config(self.scheduler_config).save_pretrained(tmp / "scheduler")
            if self.vae is not None:
                self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            (tmp / "text_encoder").mkdir()
            spec = self.text_encoder_spec
            if spec.get("type") == "clip":  # copy the encoder in; the spec then points at this folder
                encoder = self.build_text_encoder()
                encoder.save_pretrained(tmp)
                spec = {**encoder.spec(), "path": "."}
            (tmp / TEXT_ENCODER_SPEC).write_text(json.dumps(spec, indent=2) + "\n")
            if self.text_encoder is not None:
                state = {key: value.detach().cpu().contiguous() for key, value in self.text_encoder.state_dict().items()}
                save_file(state, str(tmp / TEXT_ENCODER_WEIGHTS))
            index = {
                "_class_name": type(self).__name__,
                "unet": ["diffusers", "UNet2DConditionModel"],
                "scheduler": ["diffusers", "DDPMScheduler"],
                "vae": ["diffusers", "AutoencoderKL"] if self.vae is not None else [None, None],
                "text_encoder": self.text_encoder_spec.get("type"),
                "metadata": dataclasses.asdict(self.metadata),
            }
            (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: Optional[PathLike] = None) -> "MultiViewDiffusionModel":
        """Load a model folder (default: the bundled model). A UserError names what is missing."""
        directory = model_folder(directory)
        check_model_folder(directory)
        metadata = read_metadata(directory)
        unet = UNet2DConditionModel.from_pretrained(str(directory / "unet"), low_cpu_mem_usage=False)
        vae = AutoencoderKL.from_pretrained(str(directory / "vae"), low_cpu_mem_usage=False) if metadata.latent else None
        scheduler_config = dict(DDPMScheduler.load_config(str(directory / "scheduler")))
        spec = read_text_encoder_spec(directory)
        text_encoder = load_text_encoder(directory) if spec.get("type") == "learned" else None
        model = cls(unet, scheduler_config, spec, metadata, vae=vae, text_encoder=text_encoder)
        return model.eval()


def model_folder(directory: Optional[PathLike] = None) -> Path:
    """``directory`` (user paths expanded), or the bundled model's folder when None."""
    return Path(directory).expanduser() if directory is not None else DEFAULT_MODEL_PATH


def read_metadata(directory: Optional[PathLike] = None) -> ModelMetadata:
    """The :class:`ModelMetadata` of a model folder (default: the bundled model); unknown keys ignored."""
    directory = model_folder(directory)
    check_model_folder(directory)
    index = json.loads((directory / MODEL_INDEX).read_text())
    known = {f.name for f in dataclasses.fields(ModelMetadata)}
    return ModelMetadata(**{k: v for k, v in index.get("metadata", {}).items() if k in known})


def read_text_encoder_spec(directory: Path) -> Dict[str, Any]:
    """A model folder's text encoder spec, a relative ``path`` (a copied-in CLIP) made absolute."""
    spec = json.loads((directory / TEXT_ENCODER_SPEC).read_text())
    if "path" in spec:
        spec["path"] = str((directory / spec["path"]).resolve())
    return spec


def load_text_encoder(directory: Optional[PathLike] = None) -> TextEncoder:
    """The text encoder of a model folder (default: the bundled model): the one place it is loaded."""
    directory = model_folder(directory)
    check_model_folder(directory)
    spec = read_text_encoder_spec(directory)
    weights = load_file(str(directory / TEXT_ENCODER_WEIGHTS)) if spec.get("type") == "learned" else None
    return build_text_encoder(spec, weights)


def check_model_folder(directory: Path) -> None:
    """Raise a UserError naming ``directory`` and the first missing file of the model layout."""
    if not directory.is_dir():
        raise UserError(f"model folder '{directory}' does not exist; pass --model/pretrained_model_name_or_path pointing at a model folder")
    required = [MODEL_INDEX, "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", TEXT_ENCODER_SPEC]
    missing = [name for name in required if not (directory / name).is_file()]
    if not missing:
        try:
            index = json.loads((directory / MODEL_INDEX).read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"model folder '{directory}': {MODEL_INDEX} is not valid JSON ({error})") from None
        if index.get("metadata", {}).get("latent"):
            missing = [name for name in ("vae/config.json",) if not (directory / name).is_file()]
        spec = json.loads((directory / TEXT_ENCODER_SPEC).read_text())
        if spec.get("type") == "learned" and not (directory / TEXT_ENCODER_WEIGHTS).is_file():
            missing.append(TEXT_ENCODER_WEIGHTS)
    if missing:
        raise UserError(f"model folder '{directory}' is not a multi-view diffusion model: missing {', '.join(missing)}")

