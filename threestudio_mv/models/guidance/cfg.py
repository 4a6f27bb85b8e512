"""The one classifier-free-guidance helper, shared by the sampler and the SDS guidance."""
from typing import Optional, Tuple

import torch


def predict_noise_with_cfg(
    model: "torch.nn.Module",
    sample: torch.Tensor,
    timestep: torch.Tensor,
    cond_embeddings: torch.Tensor,
    uncond_embeddings: torch.Tensor,
    camera: Optional[torch.Tensor],
    num_views: int,
    guidance_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MVDream's CFG: eps = eps_u + s (eps_c - eps_u), from ONE batched UNet call on [cond; uncond].

    ``model`` is a :class:`~threestudio_mv.models.mvdiffusion.model.MultiViewDiffusionModel` (anything
    with its ``predict_noise``); ``sample`` (B, C, h, w) with B = groups * ``num_views``; embeddings
    (B, L, D) or (1, L, D) (broadcast); ``camera`` (B, 16) or None, repeated for both halves;
    ``timestep`` a scalar or (B,). Returns (eps_cfg, eps_cond, eps_uncond), each like ``sample``.
    """
    batch = sample.shape[0]
    cond = cond_embeddings.expand(batch, -1, -1) if cond_embeddings.shape[0] == 1 else cond_embeddings
    uncond = uncond_embeddings.expand(batch, -1, -1) if uncond_embeddings.shape[0] == 1 else uncond_embeddings
    timestep = torch.as_tensor(timestep, device=sample.device)
    timesteps = timestep.expand(batch) if timestep.ndim == 0 else timestep
    eps = model.predict_noise(
        torch.cat([sample, sample]),
        torch.cat([timesteps, timesteps]),
        torch.cat([cond, uncond]).to(sample.device),
        torch.cat([camera, camera]) if camera is not None else None,
        num_views,
    )
    eps_cond, eps_uncond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond), eps_cond, eps_uncond
