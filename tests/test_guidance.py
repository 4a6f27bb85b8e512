"""Multi-view SDS / x0-SDS guidance: the gradients are the formulas they claim to be."""
from pathlib import Path

import pytest
import torch

from threestudio_mv.models.guidance.multiview_diffusion_guidance import (
    MultiviewDiffusionGuidance,
    anchor_background,
    rescale_x0_per_group,
    sds_weight,
)
from threestudio_mv.models.mvdiffusion.cfg import predict_noise_with_cfg
from threestudio_mv.models.mvdiffusion.model import ModelMetadata, MultiViewDiffusionModel
from threestudio_mv.models.mvdiffusion.unet import unet_config
from threestudio_mv.utils.camera import c2w_from_spherical, mvdream_camera_condition, view_azimuths
from threestudio_mv.utils.errors import UserError


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    spec = {"type": "learned", "words": ["a", "red", "cube"], "dim": 32, "max_length": 8, "hash_buckets": 4}
    config = unet_config(sample_size=16, block_out_channels=(32, 32), attention_levels=(False, True), cross_attention_dim=32)
    model = MultiViewDiffusionModel.create(config, spec, ModelMetadata(image_size=16))
    return model.save_pretrained(tmp_path_factory.mktemp("models") / "tiny")


def make_inputs(guidance: MultiviewDiffusionGuidance, groups: int = 2, n_view: int = 4):
    encoder = guidance.model.build_text_encoder()
    with torch.no_grad():
        cond, uncond = encoder.encode(["a red cube"]), encoder.encode([""])
    azimuth = torch.cat([view_azimuths(n_view, 30.0 * g) for g in range(groups)])
    c2w = c2w_from_spherical(torch.full_like(azimuth, 15.0), azimuth, torch.full_like(azimuth, 2.5))
    rgb = torch.rand(groups * n_view, 24, 24, 3, requires_grad=True)
    return rgb, cond, uncond, c2w


def grad_wrt_input(guidance, rgb, cond, uncond, c2w, timestep, noise):
    latents = guidance.to_model_input(rgb).detach().requires_grad_(True)
    guidance.to_model_input = lambda _: latents  # feed the latents directly to read their gradient
    out = guidance(rgb, cond, uncond, c2w, 4, timestep=timestep, noise=noise)
    out["loss_sds"].backward()
    return latents, out


def test_sds_gradient_is_weighted_noise_residual(tiny_model_dir):
    guidance = MultiviewDiffusionGuidance({"pretrained_model_name_or_path": str(tiny_model_dir), "recon_loss": False, "weighting": "sds", "guidance_scale": 7.0})
    rgb, cond, uncond, c2w = make_inputs(guidance)
    latents_shape = guidance.to_model_input(rgb).shape
    noise = torch.randn(latents_shape, generator=torch.Generator().manual_seed(3))
    latents, _ = grad_wrt_input(guidance, rgb, cond, uncond, c2w, 500, noise)
    alpha_bar = guidance.alphas_cumprod[500]
    noisy = alpha_bar.sqrt() * latents.detach() + (1 - alpha_bar).sqrt() * noise
    camera = mvdream_camera_condition(c2w)
    with torch.no_grad():
        eps_hat, _, _ = predict_noise_with_cfg(guidance.model, noisy, torch.full((8,), 500), cond, uncond, camera, 4, 7.0)
    expected = (1 - alpha_bar) * (eps_hat - noise) / 8  # w(t)(eps_hat - eps), loss normalised by B
    assert torch.allclose(latents.grad, expected, atol=1e-5)
    assert latents.grad.abs().max() > 0


def test_x0_loss_gradient_uses_rescaled_x0(tiny_model_dir):
    guidance = MultiviewDiffusionGuidance({"pretrained_model_name_or_path": str(tiny_model_dir), "recon_loss": True, "recon_std_rescale": 0.5, "guidance_scale": 5.0, "clip_x0": False})
    rgb, cond, uncond, c2w = make_inputs(guidance)
    noise = torch.randn(guidance.to_model_input(rgb).shape, generator=torch.Generator().manual_seed(4))
    latents, _ = grad_wrt_input(guidance, rgb, cond, uncond, c2w, 300, noise)
    alpha_bar = guidance.alphas_cumprod[300]
    noisy = alpha_bar.sqrt() * latents.detach() + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        eps_hat, eps_c, _ = predict_noise_with_cfg(guidance.model, noisy, torch.full((8,), 300), cond, uncond, mvdream_camera_condition(c2w), 4, 5.0)
    x0 = (noisy - (1 - alpha_bar).sqrt() * eps_hat) / alpha_bar.sqrt()
    x0_c = (noisy - (1 - alpha_bar).sqrt() * eps_c) / alpha_bar.sqrt()
    phi = torch.stack([x0_c[g * 4 : g * 4 + 4].std() / x0[g * 4 : g * 4 + 4].std() for g in range(2)])
    x0_rescaled = torch.cat([0.5 * phi[g] * x0[g * 4 : g * 4 + 4] + 0.5 * x0[g * 4 : g * 4 + 4] for g in range(2)])
    assert torch.allclose(latents.grad, (latents.detach() - x0_rescaled) / 8, atol=1e-4)


def test_rescale_formula_per_group():
    x0_cfg = torch.randn(8, 3, 4, 4) * torch.tensor([1.0] * 4 + [3.0] * 4).view(8, 1, 1, 1)
    x0_cond = torch.randn(8, 3, 4, 4)
    full = rescale_x0_per_group(x0_cfg, x0_cond, 4, 1.0)
    for g in range(2):
        assert torch.allclose(full[g * 4 : g * 4 + 4].std(), x0_cond[g * 4 : g * 4 + 4].std(), rtol=1e-4)
    assert torch.equal(rescale_x0_per_group(x0_cfg, x0_cond, 4, 0.0), x0_cfg)


def test_weightings_and_timestep_annealing(tiny_model_dir):
    alpha_bar = torch.tensor(0.25)
    assert sds_weight(alpha_bar, "sds") == pytest.approx(0.75)
    assert sds_weight(alpha_bar, "uniform") == pytest.approx(1.0)
    assert sds_weight(alpha_bar, "inverse_snr") == pytest.approx(3.0 ** 0.5)
    guidance = MultiviewDiffusionGuidance({"pretrained_model_name_or_path": str(tiny_model_dir), "min_step_percent": [0, 0.9, 0.1, 100], "max_step_percent": [0, 0.9, 0.5, 100]})
    assert guidance.min_step == guidance.max_step == 900
    guidance.update_step(0, 100)
    assert (guidance.min_step, guidance.max_step) == (100, 500)
    with pytest.raises(UserError, match="weighting"):
        MultiviewDiffusionGuidance({"pretrained_model_name_or_path": str(tiny_model_dir), "weighting": "bogus"})


def test_grad_clip_applies(tiny_model_dir):
    guidance = MultiviewDiffusionGuidance({"pretrained_model_name_or_path": str(tiny_model_dir), "recon_loss": False, "weighting": "uniform", "grad_clip": 0.01})
    rgb, cond, uncond, c2w = make_inputs(guidance)
    latents, _ = grad_wrt_input(guidance, rgb, cond, uncond, c2w, 800, None)
    assert latents.grad.abs().max() <= 0.01 / 8 + 1e-7


def test_guidance_weights_stay_out_of_module_trees(tiny_model_dir):
    guidance = MultiviewDiffusionGuidance({"pretrained_model_name_or_path": str(tiny_model_dir)})
    assert not isinstance(guidance, torch.nn.Module)
    assert all(not p.requires_grad for p in guidance.model.parameters())


def test_pixel_x0_target_is_clamped_to_image_range(tiny_model_dir):
    guidance = MultiviewDiffusionGuidance({"pretrained_model_name_or_path": str(tiny_model_dir), "clip_x0": True})
    rgb, cond, uncond, c2w = make_inputs(guidance)
    latents, _ = grad_wrt_input(guidance, rgb, cond, uncond, c2w, 950, None)
    target = latents.detach() - latents.grad * 8  # loss normalised by B = 8
    assert target.min() >= -1.0 - 1e-5 and target.max() <= 1.0 + 1e-5


def test_anchor_background_removes_a_colour_cast_from_the_whole_image():
    image = torch.ones(2, 3, 8, 8)
    image[:, :, 3:5, 3:5] = torch.tensor([0.5, -0.5, -0.5]).view(3, 1, 1)  # a red object on white
    cast = torch.tensor([[-0.2, 0.1, -0.3], [0.05, -0.1, 0.0]]).view(2, 3, 1, 1)
    anchored = anchor_background(image + cast, torch.ones(3))
    assert torch.allclose(anchored, image, atol=1e-6)


def test_x0_target_border_is_anchored_to_the_background(tiny_model_dir):
    guidance = MultiviewDiffusionGuidance({"pretrained_model_name_or_path": str(tiny_model_dir), "clip_x0": False,
                                           "recon_anchor_background": [1.0, 0.5, 0.0]})
    rgb, cond, uncond, c2w = make_inputs(guidance)
    latents, out = grad_wrt_input(guidance, rgb, cond, uncond, c2w, 700, None)
    target = latents.detach() - latents.grad * 8
    assert torch.allclose(out["target"], target, atol=1e-5)  # the returned target is the loss's
    border = torch.cat([target[..., 0, :], target[..., -1, :], target[..., :, 0], target[..., :, -1]], dim=-1)
    assert torch.allclose(border.median(dim=-1).values, torch.tensor([1.0, 0.0, -1.0]).expand(8, 3), atol=1e-5)
    with pytest.raises(UserError, match="recon_anchor_background"):
        MultiviewDiffusionGuidance({"pretrained_model_name_or_path": str(tiny_model_dir), "recon_anchor_background": [1.0, 1.0]})


def test_multi_step_x0_target_runs_an_ancestral_chain_from_t_to_0(tiny_model_dir):
    guidance = MultiviewDiffusionGuidance({"pretrained_model_name_or_path": str(tiny_model_dir), "recon_denoise_steps": 3})
    rgb, cond, uncond, c2w = make_inputs(guidance)
    clean = guidance.to_model_input(rgb).detach()  # a perfect model: every x0 prediction is the render
    calls = []
    guidance.predict_x0 = lambda sample, step, *args: calls.append((step, sample.clone())) or clean
    torch.manual_seed(5)
    latents, out = grad_wrt_input(guidance, rgb, cond, uncond, c2w, 600, None)
    assert [step for step, _ in calls] == [600, 400, 200]  # 3 timesteps evenly spaced from t down to 0
    assert torch.allclose(out["target"], clean) and latents.grad.abs().max() < 1e-6
    for step, sample in calls:  # every sample of the chain is the forward marginal of x0 = clean at its step
        alpha_bar = guidance.alphas_cumprod[step]
        residual = (sample - alpha_bar.sqrt() * clean) / (1 - alpha_bar).sqrt()
        assert abs(residual.mean()) < 0.05 and abs(residual.std() - 1.0) < 0.05
    for bad in (0, [100, 3, 0, 200]):
        with pytest.raises(UserError, match="system.guidance.recon_denoise_steps"):
            MultiviewDiffusionGuidance({"pretrained_model_name_or_path": str(tiny_model_dir), "recon_denoise_steps": bad})


def test_denoise_steps_follow_their_schedule(tiny_model_dir):
    guidance = MultiviewDiffusionGuidance({"pretrained_model_name_or_path": str(tiny_model_dir), "recon_denoise_steps": [100, 1, 3, 200]})
    rgb, cond, uncond, c2w = make_inputs(guidance)
    for global_step, expected in [(0, 1), (160, 2), (400, 3)]:
        calls = []
        guidance.predict_x0 = lambda sample, step, *args: calls.append(step) or sample
        guidance.on_update_step(0, global_step)
        guidance(rgb, cond, uncond, c2w, 4, timestep=300)
        assert len(calls) == expected
