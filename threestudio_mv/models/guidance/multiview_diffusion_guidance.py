"""Guidance `multiview-diffusion-guidance`: multi-view SDS and x0-SDS with an MVDream-style model.

Per call: renders (B, H, W, 3) in [0, 1] -> model input (resized; VAE-encoded with gradient for latent
models) -> one timestep shared by the whole batch -> noise -> one CFG UNet call (shared helper; x0-SDS
with ``recon_denoise_steps`` = k: k calls along an ancestral chain) -> loss whose gradient w.r.t. the
model input is the SDS / x0-SDS gradient.

The diffusion model is held outside any nn.Module tree, so its weights never enter a trial checkpoint.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from threestudio_mv import register
from threestudio_mv.models.mvdiffusion.cfg import anchor_background, eps_from_x0, predict_noise_with_cfg, x0_from_eps
from threestudio_mv.utils.base import Updateable
from threestudio_mv.utils.camera import mvdream_camera_condition
from threestudio_mv.utils.config import C, Schedule, parse_structured, schedule, schedule_values
from threestudio_mv.utils.errors import UserError

WEIGHTINGS = ("sds", "uniform", "inverse_snr")


def sds_weight(alphas_cumprod_t: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(t) of the SDS gradient w(t)(eps_hat - eps): ``sds`` = 1 - alpha_bar (DreamFusion, threestudio),
    ``uniform`` = 1, ``inverse_snr`` = sigma/alpha (what x0-SDS without rescale amounts to)."""
    if weighting == "sds":
        return 1.0 - alphas_cumprod_t
    if weighting == "uniform":
        return torch.ones_like(alphas_cumprod_t)
    if weighting == "inverse_snr":
        return ((1.0 - alphas_cumprod_t) / alphas_cumprod_t).sqrt()
    raise UserError(f"config key 'system.guidance.weighting': unknown '{weighting}'; use one of {', '.join(WEIGHTINGS)}")


def rescale_x0_per_group(x0_cfg: torch.Tensor, x0_cond: torch.Tensor, n_view: int, rescale: float) -> torch.Tensor:
    """MVDream's CFG rescale on x0, per object group of ``n_view`` views:
    phi_g = std(x0_cond_g) / std(x0_cfg_g);  x0 <- r * phi_g * x0_cfg + (1 - r) * x0_cfg."""
    groups = x0_cfg.shape[0] // n_view
    std_cfg = x0_cfg.reshape(groups, -1).std(dim=1) + 1e-8
    std_cond = x0_cond.reshape(groups, -1).std(dim=1) + 1e-8
    factor = (std_cond / std_cfg).repeat_interleave(n_view).view(-1, *([1] * (x0_cfg.ndim - 1)))
    return rescale * factor * x0_cfg + (1.0 - rescale) * x0_cfg


@register("multiview-diffusion-guidance")
class MultiviewDiffusionGuidance(Updateable):
    """Score distillation from a multi-view diffusion model folder (default: the bundled one)."""

    @dataclass
    class Config:
        pretrained_model_name_or_path: Optional[str] = None  # model folder; None = the bundled model
        guidance_scale: Schedule = schedule(5.0)
        recon_loss: bool = True  # x0-SDS (MVDream's reconstruction loss); False = plain SDS
        recon_std_rescale: float = 0.5
        # x0-SDS: denoising steps from x_t to the x0 target. 1 = MVDream's one-step prediction; k > 1 = an
        # ancestral DDPM chain over k timesteps from t down to 0, which commits to one sample where the
        # one-step prediction is the blurred mean of all of them (k UNet calls per training step). A C()
        # schedule, rounded: e.g. [200, 1, 3, 300] keeps one step while the shape forms
        recon_denoise_steps: Schedule = schedule(1)
        clip_x0: bool = True  # pixel-space models: clamp predicted x0 to the image range [-1, 1]
        # pixel-space models: shift each x0 target so its border is this RGB colour in [0, 1] (the
        # renders' background); None leaves the target's colour cast alone
        recon_anchor_background: Optional[List[float]] = None
        weighting: str = "sds"  # SDS only: sds | uniform | inverse_snr
        min_step_percent: Schedule = schedule([0, 0.98, 0.02, 400])
        max_step_percent: Schedule = schedule([0, 0.98, 0.5, 400])
        grad_clip: Optional[Any] = None  # None, a number or a schedule: clamp of the per-element gradient

    def __init__(self, cfg: Optional[Any] = None, prefix: str = "system.guidance") -> None:
        self.cfg = cfg if isinstance(cfg, self.Config) else parse_structured(self.Config, cfg, prefix)
        if self.cfg.weighting not in WEIGHTINGS:
            raise UserError(f"config key '{prefix}.weighting': unknown '{self.cfg.weighting}'; use one of {', '.join(WEIGHTINGS)}")
        if min(schedule_values(self.cfg.recon_denoise_steps)) < 0.5:  # rounds to 0 somewhere
            raise UserError(f"config key '{prefix}.recon_denoise_steps' must be at least 1, got {self.cfg.recon_denoise_steps}")
        anchor = self.cfg.recon_anchor_background
        if anchor is not None and (len(anchor) != 3 or not all(0.0 <= float(c) <= 1.0 for c in anchor)):
            raise UserError(f"config key '{prefix}.recon_anchor_background' must be 3 numbers in [0, 1] (an RGB colour) or null, got {list(anchor)}")
        from threestudio_mv.models.mvdiffusion.model import MultiViewDiffusionModel

        self.model = MultiViewDiffusionModel.from_pretrained(self.cfg.pretrained_model_name_or_path).requires_grad_(False).eval()
        self.alphas_cumprod = self.model.noise_scheduler().alphas_cumprod.float()
        self.num_train_timesteps = int(self.alphas_cumprod.shape[0])
        # the anchor colour in the model's pixel range [-1, 1]; latent models have no pixel border
        self.anchor_colour = None
        if anchor is not None and not self.model.metadata.latent:
            self.anchor_colour = torch.tensor([float(c) for c in anchor]) * 2.0 - 1.0
        self.on_update_step(0, 0)

    @property
    def image_size(self) -> int:
        return self.model.metadata.image_size

    def on_update_step(self, epoch: int, global_step: int) -> None:
        self.global_step = global_step
        self.min_step = round(self.num_train_timesteps * C(self.cfg.min_step_percent, global_step))
        self.max_step = round(self.num_train_timesteps * C(self.cfg.max_step_percent, global_step))
        last = self.num_train_timesteps - 1
        self.min_step, self.max_step = sorted((min(max(self.min_step, 0), last), min(max(self.max_step, 0), last)))

    def to_model_input(self, rgb: torch.Tensor) -> torch.Tensor:
        """Renders (B, H, W, 3) in [0, 1] -> model samples (B, C, h, w), differentiable."""
        images = rgb.permute(0, 3, 1, 2) * 2.0 - 1.0
        size = self.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, (size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.model.encode_images(images)

    def predict_x0(
        self, noisy: torch.Tensor, timestep: int, cond: torch.Tensor, uncond: torch.Tensor, camera: torch.Tensor,
        n_view: int, scale: float,
    ) -> torch.Tensor:
        """One CFG prediction of x0 from ``noisy`` at ``timestep``: MVDream's per-group rescale, the
        background anchor and (pixel models) the clamp to [-1, 1]."""
        alpha_bar = self.alphas_cumprod[timestep]
        t = torch.full((noisy.shape[0],), timestep, device=noisy.device, dtype=torch.long)
        eps_cfg, eps_cond, _ = predict_noise_with_cfg(self.model, noisy, t, cond, uncond, camera, n_view, scale)
        x0 = x0_from_eps(noisy, eps_cfg, alpha_bar)
        if self.cfg.recon_std_rescale > 0:
            x0_cond = x0_from_eps(noisy, eps_cond, alpha_bar)
            x0 = rescale_x0_per_group(x0, x0_cond, n_view, self.cfg.recon_std_rescale)
        if self.anchor_colour is not None:
            x0 = anchor_background(x0, self.anchor_colour)
        if self.cfg.clip_x0 and not self.model.metadata.latent:
            x0 = x0.clamp(-1.0, 1.0)
        return x0

    def x0_target(
        self, noisy: torch.Tensor, timestep: int, cond: torch.Tensor, uncond: torch.Tensor, camera: torch.Tensor,
        n_view: int, scale: float,
    ) -> torch.Tensor:
        """The x0-SDS target: :meth:`predict_x0` at ``timestep``, or with ``recon_denoise_steps`` = k > 1
        the last x0 prediction of a DDPM ancestral chain over k timesteps evenly spaced from t to 0."""
        steps = round(C(self.cfg.recon_denoise_steps, self.global_step))
        if steps == 1:
            return self.predict_x0(noisy, timestep, cond, uncond, camera, n_view, scale)
        timesteps = torch.linspace(timestep, 0, steps + 1)[:-1].round().long().unique_consecutive()
        scheduler = self.model.noise_scheduler()
        scheduler.set_timesteps(timesteps=timesteps.tolist(), device=noisy.device)
        sample = noisy
        for index, step in enumerate(timesteps.tolist()):
            x0 = self.predict_x0(sample, step, cond, uncond, camera, n_view, scale)
            if index == len(timesteps) - 1:
                break
            # the scheduler takes eps: the one implied by the processed x0 (as the sampler's anchor)
            eps = eps_from_x0(sample, x0, self.alphas_cumprod[step])
            sample = scheduler.step(eps, step, sample).prev_sample
        return x0

    def __call__(
        self,
        rgb: torch.Tensor,
        cond_embeddings: torch.Tensor,
        uncond_embeddings: torch.Tensor,
        c2w: torch.Tensor,
        n_view: int,
        timestep: Optional[int] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Loss for renders ``rgb`` (B, H, W, 3) of B/n_view objects seen by cameras ``c2w`` (B, 4, 4).

        Returns ``loss_sds`` (whose gradient w.r.t. the model input is the (x0-)SDS gradient divided
        by B), ``target`` (what the model input is pulled towards, detached: the x0 target in x0-SDS),
        ``grad_norm``, ``timestep``, ``min_step``, ``max_step``.
        """
        if rgb.shape[0] % n_view != 0:
            raise ValueError(f"batch of {rgb.shape[0]} renders is not a whole number of {n_view}-view groups")
        if self.model.device != rgb.device:
            self.model.to(rgb.device)
            self.alphas_cumprod = self.alphas_cumprod.to(rgb.device)
        batch = rgb.shape[0]
        latents = self.to_model_input(rgb)
        if timestep is None:
            timestep = int(torch.randint(self.min_step, self.max_step + 1, (1,)).item())
        t = torch.full((batch,), timestep, device=rgb.device, dtype=torch.long)
        if noise is None:
            noise = torch.randn_like(latents)
        alpha_bar = self.alphas_cumprod[timestep]
        with torch.no_grad():
            noisy = alpha_bar.sqrt() * latents + (1.0 - alpha_bar).sqrt() * noise
            camera = mvdream_camera_condition(c2w).to(rgb.device)
            scale = C(self.cfg.guidance_scale, self.global_step)
            if self.cfg.recon_loss:
                grad = latents.detach() - self.x0_target(noisy, timestep, cond_embeddings, uncond_embeddings, camera, n_view, scale)
            else:
                eps_cfg, _, _ = predict_noise_with_cfg(
                    self.model, noisy, t, cond_embeddings, uncond_embeddings, camera, n_view, scale
                )
                grad = sds_weight(alpha_bar, self.cfg.weighting) * (eps_cfg - noise)
            grad = torch.nan_to_num(grad)
            if self.cfg.grad_clip is not None:
                clip = C(self.cfg.grad_clip, self.global_step)
                grad = grad.clamp(-clip, clip)
        target = (latents - grad).detach()
        loss = 0.5 * F.mse_loss(latents, target, reduction="sum") / batch
        return {
            "loss_sds": loss,
            "target": target,
            "grad_norm": grad.norm(),
            "timestep": torch.tensor(timestep),
            "min_step": torch.tensor(self.min_step),
            "max_step": torch.tensor(self.max_step),
        }
