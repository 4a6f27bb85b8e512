"""The shared DDIM loop and reference-frame mechanics (models/mvdiffusion/sampler.py)."""
import torch
from diffusers import DDPMScheduler

from threestudio_mv.models.mvdiffusion.model import sd_scheduler_config
from threestudio_mv.models.mvdiffusion.sampler import (
    ddim_sample,
    impose_references,
    noise_targets,
    target_loss,
    training_target,
)


def test_impose_references_replaces_only_reference_frames():
    sample, refs = torch.zeros(4, 3, 2, 2), torch.ones(4, 3, 2, 2)
    is_ref = torch.tensor([True, False, True, False])
    out = impose_references(sample, refs, is_ref)
    assert torch.equal(out[is_ref], refs[is_ref]) and torch.equal(out[~is_ref], sample[~is_ref])
    assert torch.equal(sample, torch.zeros_like(sample))  # not mutated


def test_noise_targets_keeps_references_clean_and_loss_ignores_them():
    scheduler = DDPMScheduler.from_config(sd_scheduler_config())
    clean, noise = torch.rand(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    is_ref = torch.tensor([True, False, False, False])
    noisy = noise_targets(scheduler, clean, noise, torch.full((4,), 900), is_ref)
    assert torch.equal(noisy[0], clean[0]) and not torch.allclose(noisy[1], clean[1], atol=0.1)
    target = training_target(scheduler, clean, noise, torch.full((4,), 900))
    assert torch.equal(target, noise)
    wrong_reference = target.clone()
    wrong_reference[0] += 10.0
    assert target_loss(wrong_reference, target, is_ref) == 0.0
    assert target_loss(target + 1.0, target, is_ref) == 1.0


def test_v_prediction_target_and_sampler_recover_a_known_x0():
    """With the exact v (or eps) of a fixed x0, DDIM lands on that x0; references come out unchanged."""
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    refs = torch.rand(3, 3, 4, 4) * 2 - 1
    is_ref = torch.tensor([True, False, False])
    for kind in ("epsilon", "v_prediction"):
        config = {**sd_scheduler_config(), "prediction_type": kind}
        scheduler = DDPMScheduler.from_config(config)
        bars = scheduler.alphas_cumprod

        def predict(sample, timestep):
            a = bars[int(timestep)]
            eps = (sample - a.sqrt() * x0) / (1 - a).sqrt()
            return eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

        out = ddim_sample(predict, x0.shape, config, 10, generator=torch.Generator().manual_seed(0), references=refs, is_reference=is_ref)
        # DDIM's last step lands on alphas_cumprod[0] = 0.9991 (set_alpha_to_one False): x0 up to ~0.03 noise
        assert (out[1:] - x0[1:]).abs().max() < 0.12, kind
        assert torch.equal(out[0], refs[0])
