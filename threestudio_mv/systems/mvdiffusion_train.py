"""System `mvdiffusion-train-system`: train the multi-view diffusion model (MVDream architecture).

Epsilon loss on groups of views (one timestep per object), 10% condition dropout for CFG, an EMA of
the weights (what gets exported), AdamW with linear warm-up and an optional cosine decay. Frozen
text encoders run once per text (on-disk cache) and never enter the training graph. Validation
saves a grid (captions x views) of DDIM samples from the EMA model; the EMA model folder is exported
to ``<trial>/model/`` every ``export_every_n_steps`` and at the end.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from threestudio_mv import register
from threestudio_mv.models.mvdiffusion.model import ModelMetadata, MultiViewDiffusionModel, sd_scheduler_config
from threestudio_mv.models.mvdiffusion.pipeline import sample_multiview
from threestudio_mv.models.mvdiffusion.unet import build_unet, unet_config
from threestudio_mv.models.prompt_processors.cache import CachedTextEncoder
from threestudio_mv.models.mvdiffusion.text_encoders import TextEncoder, build_text_encoder
from threestudio_mv.systems.base import BaseSystem, OptimizerConfig
from threestudio_mv.utils.trainer import warmup_cosine_factor


@dataclass
class UNetConfig:
    block_out_channels: List[int] = field(default_factory=lambda: [32, 64, 64])
    attention_levels: List[bool] = field(default_factory=lambda: [False, True, True])
    layers_per_block: int = 1
    num_attention_heads: int = 2
    norm_num_groups: int = 32


@dataclass
class NewModelConfig:
    """A model built from scratch (ignored when ``pretrained_model_name_or_path`` is set)."""

    image_size: int = 32
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: Dict[str, Any] = field(default_factory=lambda: {"type": "minilm", "max_length": 24})
    prompt_suffix: str = ""
    default_fovy: float = 40.0
    default_elevation: float = 15.0
    relative_distance: float = 0.92
    guidance_scale: float = 5.0
    num_inference_steps: int = 50
    eta: float = 1.0  # DDIM eta of the model's samplers (ModelMetadata.eta)
    description: str = ""


@register("mvdiffusion-train-system")
class MVDiffusionTrainSystem(BaseSystem):
    """Trains a :class:`MultiViewDiffusionModel` on ``procedural-multiview-datamodule`` batches."""

    @dataclass
    class Config(BaseSystem.Config):
        pretrained_model_name_or_path: Optional[str] = None  # fine-tune this model folder instead
        model: NewModelConfig = field(default_factory=NewModelConfig)
        optimizer: OptimizerConfig = field(
            default_factory=lambda: OptimizerConfig(name="AdamW", args={"lr": 5e-4, "betas": [0.9, 0.999], "weight_decay": 0.01})
        )
        warmup_steps: int = 100
        # Cosine lr decay from this step to trainer.max_steps, ending at min_lr_ratio * lr; None = constant lr.
        # Set it when resuming for a final phase: the lambda is recomputed from the config on resume.
        decay_start_step: Optional[int] = None
        min_lr_ratio: float = 0.1
        cond_drop_prob: float = 0.1  # fraction of objects trained with the empty prompt (for CFG)
        # "Offset noise": add noise_offset * N(0,1) per image and channel to the noise, so an epsilon
        # model with SD's schedule (non-zero terminal SNR) can learn uniform backgrounds; 0 = off.
        noise_offset: float = 0.0
        ema_decay: float = 0.995
        text_cache_dir: Optional[str] = None  # default $XDG_CACHE_HOME/threestudio-mv/text_embeddings
        export_every_n_steps: int = 500  # 0: only at the end
        val_guidance_scale: float = 5.0
        val_inference_steps: int = 50
        val_seed: int = 0

    cfg: Config

    def configure(self) -> None:
        if self.cfg.pretrained_model_name_or_path:
            self.model = MultiViewDiffusionModel.from_pretrained(self.cfg.pretrained_model_name_or_path).train()
            text_encoder = self.model.build_text_encoder()
        else:
            text_encoder = build_text_encoder(self.cfg.model.text_encoder)
            self.model = self._new_model(text_encoder)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.cfg.ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        if self.model.vae is not None:
            self.model.vae.requires_grad_(False)
        # A frozen encoder is a plain attribute (not a submodule): not in checkpoints, not trained.
        self.text_cache: Optional[CachedTextEncoder] = None
        if not text_encoder.trainable:
            cache_dir = Path(self.cfg.text_cache_dir).expanduser() if self.cfg.text_cache_dir else None
            self.text_cache = CachedTextEncoder(text_encoder, cache_dir)

    def _new_model(self, text_encoder: TextEncoder) -> MultiViewDiffusionModel:
        new = self.cfg.model
        config = unet_config(
            sample_size=new.image_size,
            block_out_channels=new.unet.block_out_channels,
            attention_levels=new.unet.attention_levels,
            layers_per_block=new.unet.layers_per_block,
            cross_attention_dim=text_encoder.dim,
            num_attention_heads=new.unet.num_attention_heads,
            norm_num_groups=new.unet.norm_num_groups,
        )
        metadata = ModelMetadata(
            image_size=new.image_size,
            prompt_suffix=new.prompt_suffix,
            default_fovy=new.default_fovy,
            default_elevation=new.default_elevation,
            relative_distance=new.relative_distance,
            guidance_scale=new.guidance_scale,
            num_inference_steps=new.num_inference_steps,
            eta=new.eta,
            description=new.description,
        )
        return MultiViewDiffusionModel(
            build_unet(config), sd_scheduler_config(), text_encoder.spec(), metadata, text_encoder=text_encoder
        )

    # ----------------------------------------------------------------------------- text
    def _with_suffix(self, captions: List[str]) -> List[str]:
        suffix = self.model.metadata.prompt_suffix
        return [caption + suffix if caption else caption for caption in captions]

    def text_embeddings(self, captions: List[str], model: Optional[MultiViewDiffusionModel] = None) -> torch.Tensor:
        """(B, L, D) embeddings of ``captions`` (suffix added; "" stays empty) on the system's device."""
        texts = self._with_suffix(list(captions))
        model = model or self.model
        if model.text_encoder is not None:
            return model.text_encoder.encode(texts)
        return self.text_cache.encode(texts).to(self.device)

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.model.vae is None and datamodule is not None and hasattr(datamodule, "pixel_mean"):
            init_mean = datamodule.pixel_mean()
            background = [float(c) for c in datamodule.cfg.background]
            for model in (self.model, self.ema_model):
                model.metadata.init_mean = init_mean
                model.metadata.background = background  # samplers anchor x0 to it
        if self.text_cache is not None and datamodule is not None and hasattr(datamodule, "texts"):
            texts = self._with_suffix(datamodule.texts()) + [""]
            self.text_cache.encode(texts, progress=self.trainer.is_global_zero)

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        images, num_views = batch["images"], int(batch["num_views"])
        n_images = images.shape[0]
        n_objects = n_images // num_views
        scheduler = self.model.noise_scheduler()
        with torch.no_grad():
            clean = self.model.encode_images(images)
        # One timestep and one dropout decision per object: all its views share the noise level.
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n_objects,), device=self.device)
        timesteps = timesteps.repeat_interleave(num_views)
        drop = (torch.rand(n_objects, device=self.device) < self.cfg.cond_drop_prob).repeat_interleave(num_views)
        captions = ["" if dropped else caption for caption, dropped in zip(batch["captions"], drop.tolist())]
        noise = torch.randn_like(clean)
        if self.cfg.noise_offset > 0:
            noise = noise + self.cfg.noise_offset * torch.randn(noise.shape[0], noise.shape[1], 1, 1, device=noise.device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        eps = self.model.predict_noise(noisy, timesteps, self.text_embeddings(captions), batch["camera"], num_views)
        loss = F.mse_loss(eps.float(), noise.float())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here (not in on_train_batch_end) so the step's checkpoint already holds this EMA update.
        self.ema.update_parameters(self.model)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.cfg.export_every_n_steps
        if every > 0 and self.true_global_step % every == 0:
            self.export_model()

    def on_train_end(self) -> None:
        self.export_model()

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        cfg, end = self.cfg, self.trainer.max_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine_factor(step, cfg.warmup_steps, cfg.decay_start_step, end, cfg.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ----------------------------------------------------------------------------- outputs
    @property
    def ema_model(self) -> MultiViewDiffusionModel:
        return self.ema.module

    def export_model(self) -> Optional[Path]:
        """Save the EMA model folder to ``<trial>/model`` (rank 0; atomic)."""
        if not self.is_global_zero:
            return None
        return self.ema_model.save_pretrained(self.trial_dir / "model")

    def export(self) -> Dict[str, Path]:
        return {"model": self.ema_model.save_pretrained(self.trial_dir / "model")}

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        self.save_sample_grid(batch, f"it{self.true_global_step}-val.png")

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        self.save_sample_grid(batch, f"it{self.true_global_step}-test.png")

    def save_sample_grid(self, batch: Dict[str, Any], name: str) -> None:
        """DDIM samples of the EMA model for the batch's captions and cameras: one row per caption."""
        model = self.ema_model
        num_views = int(batch["num_views"])
        captions = list(batch["captions"])
        generator = torch.Generator().manual_seed(self.cfg.val_seed)
        images = sample_multiview(
            model,
            self.text_embeddings(captions, model),
            self.text_embeddings([""], model),
            batch["c2w"],
            num_views,
            guidance_scale=self.cfg.val_guidance_scale,
            num_inference_steps=self.cfg.val_inference_steps,
            generator=generator,
            progress=False,
            eta=model.metadata.eta,
        )
        views = images.permute(0, 2, 3, 1).cpu()
        rows = [list(views[start : start + num_views]) for start in range(0, len(captions), num_views)]
        self.save_image_grid(name, rows)
