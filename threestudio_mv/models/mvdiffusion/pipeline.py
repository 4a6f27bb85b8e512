"""Sampling multi-view images: DDIM (any eta) with classifier-free guidance through the shared helper."""
from typing import Optional

import torch
from tqdm import tqdm

from threestudio_mv.models.guidance.cfg import anchor_background, eps_from_x0, predict_noise_with_cfg, x0_from_eps
from threestudio_mv.models.mvdiffusion.model import MultiViewDiffusionModel
from threestudio_mv.utils.camera import mvdream_camera_condition


@torch.no_grad()
def sample_multiview(
    model: MultiViewDiffusionModel,
    cond_embeddings: torch.Tensor,
    uncond_embeddings: torch.Tensor,
    c2w: torch.Tensor,
    num_views: int,
    guidance_scale: float = 5.0,
    num_inference_steps: int = 50,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
    anchor: bool = True,
    eta: float = 0.0,
) -> torch.Tensor:
    """Generate images for G objects x ``num_views`` cameras.

    ``cond_embeddings`` (G*F, L, D) or (1, L, D); ``uncond_embeddings`` likewise; ``c2w`` (G*F, 4, 4)
    in our camera convention, views of one object contiguous. ``generator`` (a CPU generator) makes
    the initial noise, and with ``eta`` > 0 each step's fresh noise, reproducible on any device; with
    ``model.metadata.init_mean`` the start is the forward process's marginal at the first timestep. With ``anchor`` and a pixel model whose
    ``metadata.background`` is set, each step's x0 prediction is shifted so its border is that colour
    (:func:`~threestudio_mv.models.guidance.cfg.anchor_background`). Returns images (G*F, 3, H, W) in [0, 1].
    """
    device = model.device
    batch = c2w.shape[0]
    camera = mvdream_camera_condition(c2w).to(device)
    scheduler = model.ddim_scheduler()
    scheduler.set_timesteps(num_inference_steps, device=device)
    shape = (batch, model.sample_channels, model.sample_size, model.sample_size)
    sample = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
    if model.metadata.init_mean is not None:
        alpha_bar = scheduler.alphas_cumprod[scheduler.timesteps[0]].to(device)
        mean = torch.tensor(model.metadata.init_mean, dtype=sample.dtype, device=device).view(1, -1, 1, 1)
        sample = alpha_bar.sqrt() * mean + (1.0 - alpha_bar).sqrt() * sample
    background = None
    if anchor and model.metadata.background is not None and not model.metadata.latent:
        background = torch.tensor(model.metadata.background, dtype=sample.dtype, device=device) * 2.0 - 1.0
    for timestep in tqdm(scheduler.timesteps, total=len(scheduler.timesteps), desc="DDIM", disable=not progress):
        eps, _, _ = predict_noise_with_cfg(
            model, sample, timestep, cond_embeddings.to(device), uncond_embeddings.to(device),
            camera, num_views, guidance_scale,
        )
        if background is not None:
            alpha_bar = scheduler.alphas_cumprod[timestep].to(device)
            x0 = anchor_background(x0_from_eps(sample, eps, alpha_bar), background)
            eps = eps_from_x0(sample, x0, alpha_bar)
        noise = torch.randn(shape, generator=generator).to(device) if eta > 0 else None
        sample = scheduler.step(eps, timestep, sample, eta=eta, variance_noise=noise).prev_sample
    images = model.decode_samples(sample)
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
