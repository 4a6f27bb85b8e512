"""The one DDIM loop of the multi-view model family, and the reference-frame mechanics every method shares.

A method's sample is a batch of frames. Some frames may be *references* (given views: MVGenMaster's
posed photos, MVDiffusion++'s input images, the panorama's outpainted view): they are carried in the
batch, kept clean (or noised to the current timestep), re-imposed after every sampler step, and carry
no loss in training. What differs between methods (conditions, CFG branches) lives in the ``predict``
callable each method passes in.
"""
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from diffusers import DDIMScheduler
from torch import Tensor
from tqdm import tqdm

from threestudio_mv.models.mvdiffusion.cfg import eps_from_x0, x0_from_eps

Predict = Callable[[Tensor, Tensor], Tensor]


def impose_references(sample: Tensor, references: Tensor, is_reference: Tensor) -> Tensor:
    """``sample`` (B, C, H, W) with the frames where ``is_reference`` (B,) is True taken from
    ``references`` (B, C, H, W; its other rows are ignored). Returns a new tensor."""
    keep = is_reference.to(device=sample.device, dtype=torch.bool).view(-1, *([1] * (sample.ndim - 1)))
    return torch.where(keep, references.to(sample), sample)


def noise_targets(scheduler: Any, clean: Tensor, noise: Tensor, timesteps: Tensor, is_reference: Tensor) -> Tensor:
    """Training input: target frames noised to ``timesteps`` (B,), reference frames left clean."""
    return impose_references(scheduler.add_noise(clean, noise, timesteps), clean, is_reference)


def training_target(scheduler: Any, clean: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the model predicts: the noise (``epsilon``) or the velocity (``v_prediction``), as the
    scheduler's ``prediction_type`` says."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    raise ValueError(f"unsupported prediction_type '{kind}' (epsilon or v_prediction)")


def target_loss(prediction: Tensor, target: Tensor, is_reference: Tensor) -> Tensor:
    """Mean squared error over the target frames only (references carry no loss)."""
    targets = ~is_reference.to(device=prediction.device, dtype=torch.bool)
    if not bool(targets.any()):
        raise ValueError("target_loss needs at least one target frame")
    return torch.nn.functional.mse_loss(prediction[targets].float(), target[targets].float())


def _to_x0_and_eps(kind: str, sample: Tensor, output: Tensor, alpha_bar: Tensor) -> Tuple[Tensor, Tensor]:
    """(x0, eps) implied by a model ``output`` of prediction type ``kind``."""
    if kind == "epsilon":
        return x0_from_eps(sample, output, alpha_bar), output
    if kind == "v_prediction":
        x0 = alpha_bar.sqrt() * sample - (1.0 - alpha_bar).sqrt() * output
        eps = alpha_bar.sqrt() * output + (1.0 - alpha_bar).sqrt() * sample
        return x0, eps
    raise ValueError(f"unsupported prediction_type '{kind}' (epsilon or v_prediction)")


def _from_x0(kind: str, sample: Tensor, x0: Tensor, alpha_bar: Tensor) -> Tensor:
    """The model output of type ``kind`` that implies ``x0`` for ``sample``."""
    eps = eps_from_x0(sample, x0, alpha_bar)
    if kind == "epsilon":
        return eps
    return alpha_bar.sqrt() * eps - (1.0 - alpha_bar).sqrt() * x0


@torch.no_grad()
def ddim_sample(
    predict: Predict,
    shape: Sequence[int],
    scheduler_config: Dict[str, Any],
    num_inference_steps: int,
    *,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    init_mean: Optional[Sequence[float]] = None,
    references: Optional[Tensor] = None,
    is_reference: Optional[Tensor] = None,
    renoise_references: bool = False,
    x0_transform: Optional[Callable[[Tensor], Tensor]] = None,
    device: Optional[torch.device] = None,
    progress: bool = False,
    desc: str = "DDIM",
) -> Tensor:
    """Run DDIM (diffusers' scheduler, any ``eta``) from noise to a sample of ``shape`` (B, C, H, W).

    ``predict(sample, timestep)`` returns the model output in the scheduler's ``prediction_type``
    (classifier-free guidance is the caller's, inside the callable). ``generator`` (a CPU generator)
    makes the start and, with ``eta`` > 0, each step's noise, reproducible on any device.
    ``init_mean`` (C,) starts from the forward process's marginal at the first timestep instead of
    N(0, 1). ``references`` with ``is_reference`` (B,) are imposed before the first step and after
    every step: clean, or with ``renoise_references`` noised to the next timestep (exact at the end).
    ``x0_transform`` maps each step's x0 prediction (B, C, H, W) to the one the step continues from
    (e.g. :func:`~threestudio_mv.models.mvdiffusion.cfg.anchor_background`, or a panorama's overlap
    fusion). Returns the final sample.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    kind = scheduler.config.prediction_type
    timesteps = list(scheduler.timesteps)
    shape = tuple(shape)
    sample = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
    if init_mean is not None:
        alpha_bar = scheduler.alphas_cumprod[timesteps[0]].to(device)
        mean = torch.as_tensor(init_mean, dtype=sample.dtype, device=device).view(1, -1, 1, 1)
        sample = alpha_bar.sqrt() * mean + (1.0 - alpha_bar).sqrt() * sample
    if (references is None) != (is_reference is None):
        raise ValueError("references and is_reference go together")
    reference_noise = None
    if references is not None:
        references = references.to(device=device, dtype=sample.dtype)
        reference_noise = torch.randn(shape, generator=generator).to(device)

    def reference_frames(next_index: int) -> Tensor:
        if not renoise_references or next_index >= len(timesteps):
            return references
        t = timesteps[next_index].reshape(1).expand(shape[0])
        return scheduler.add_noise(references, reference_noise, t)

    if references is not None:
        sample = impose_references(sample, reference_frames(0), is_reference)
    for index, timestep in enumerate(tqdm(timesteps, total=len(timesteps), desc=desc, disable=not progress)):
        output = predict(sample, timestep)
        if x0_transform is not None:
            alpha_bar = scheduler.alphas_cumprod[timestep].to(device)
            x0, _ = _to_x0_and_eps(kind, sample, output, alpha_bar)
            output = _from_x0(kind, sample, x0_transform(x0), alpha_bar)
        noise = torch.randn(shape, generator=generator).to(device) if eta > 0 else None
        sample = scheduler.step(output, timestep, sample, eta=eta, variance_noise=noise).prev_sample
        if references is not None:
            sample = impose_references(sample, reference_frames(index + 1), is_reference)
    return sample
