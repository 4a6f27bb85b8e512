"""The multi-view UNet: attention processor, camera embedding, model folders, CFG helper."""
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import AttnProcessor2_0

from threestudio_mv.models.mvdiffusion.attention import per_view_processors
from threestudio_mv.models.mvdiffusion.cfg import predict_noise_with_cfg
from threestudio_mv.models.mvdiffusion.model import ModelMetadata, MultiViewDiffusionModel
from threestudio_mv.models.mvdiffusion.unet import build_unet, unet_config
from threestudio_mv.utils.camera import c2w_from_spherical, mvdream_camera_condition
from threestudio_mv.utils.errors import UserError

TEXT = {"type": "learned", "words": ["a", "red", "cube"], "dim": 16, "max_length": 4}


def tiny_config(**overrides) -> dict:
    options = dict(sample_size=8, block_out_channels=(16, 32), attention_levels=(True, True), cross_attention_dim=16, norm_num_groups=8)
    options.update(overrides)
    return unet_config(**options)


def run(unet, sample, camera, num_views, text=None):
    text = text if text is not None else torch.ones(sample.shape[0], 4, 16) * 0.1
    with torch.no_grad():
        return unet(sample, torch.full((sample.shape[0],), 500), text, class_labels=camera, cross_attention_kwargs={"num_views": num_views}).sample


def test_single_view_matches_diffusers_default_attention() -> None:
    unet = build_unet(tiny_config())
    sample, camera = torch.randn(3, 3, 8, 8), torch.randn(3, 16)
    ours = run(unet, sample, camera, 1)
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        reference = unet(sample, torch.full((3,), 500), torch.ones(3, 4, 16) * 0.1, class_labels=camera).sample
    assert torch.allclose(ours, reference, atol=1e-5)


def test_views_of_one_object_attend_to_each_other_but_not_to_other_objects() -> None:
    unet = build_unet(tiny_config())
    sample, camera = torch.randn(8, 3, 8, 8), torch.randn(8, 16)
    base = run(unet, sample, camera, 4)
    perturbed = sample.clone()
    perturbed[5] += 1.0  # a view of object 2
    out = run(unet, perturbed, camera, 4)
    assert torch.allclose(out[:4], base[:4], atol=1e-6)  # object 1 untouched
    assert (out[4] - base[4]).abs().max() > 1e-4  # another view of object 2 changed
    # Per-view attention (F ignored) keeps even views of one object apart.
    unet.set_attn_processor(per_view_processors(unet))
    assert torch.allclose(run(unet, perturbed, camera, 4)[4], run(unet, sample, camera, 4)[4], atol=1e-6)


def test_batch_not_multiple_of_views_is_rejected() -> None:
    model = MultiViewDiffusionModel.create(tiny_config(), TEXT, ModelMetadata(image_size=8))
    with pytest.raises(ValueError, match="multiple of num_views"):
        model.predict_noise(torch.randn(6, 3, 8, 8), torch.tensor(10), torch.zeros(6, 4, 16), None, 4)


def test_camera_condition_changes_the_output() -> None:
    unet = build_unet(tiny_config())
    torch.nn.init.normal_(unet.class_embedding.linear_2.weight, std=0.5)
    sample = torch.randn(4, 3, 8, 8)
    c2w = c2w_from_spherical(torch.full((4,), 15.0), torch.arange(4) * 90.0, torch.full((4,), 2.0))
    front = run(unet, sample, mvdream_camera_condition(c2w), 4)
    turned = run(unet, sample, mvdream_camera_condition(c2w.roll(1, dims=0)), 4)
    none = run(unet, sample, torch.zeros(4, 16), 4)
    assert (front - turned).abs().max() > 1e-3 and (front - none).abs().max() > 1e-3


def test_model_folder_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = MultiViewDiffusionModel.create(tiny_config(), TEXT, ModelMetadata(image_size=8, prompt_suffix=", 3d asset"))
    sample = torch.randn(4, 3, 8, 8)
    text = model.text_encoder.encode(["a red cube"] * 4)
    expected = model.predict_noise(sample, torch.tensor(300), text, None, 4)
    model.save_pretrained(tmp_path / "model")
    model.save_pretrained(tmp_path / "model")  # replacing an existing folder works too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left
    loaded = MultiViewDiffusionModel.from_pretrained(tmp_path / "model")
    assert loaded.metadata.prompt_suffix == ", 3d asset" and loaded.text_encoder_spec == model.text_encoder_spec
    text_loaded = loaded.text_encoder.encode(["a red cube"] * 4)
    assert torch.equal(text, text_loaded)
    assert torch.equal(expected, loaded.predict_noise(sample, torch.tensor(300), text_loaded, None, 4))
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["metadata"]["image_size"] == 8


def test_latent_model_with_tiny_vae(tmp_path: Path) -> None:
    vae = AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16,
    )
    model = MultiViewDiffusionModel.create(
        tiny_config(in_channels=4), TEXT, ModelMetadata(image_size=16, latent=True), vae=vae
    )
    assert model.sample_size == 8 and model.sample_channels == 4
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    latents = model.encode_images(images)
    assert latents.shape == (4, 4, 8, 8)
    eps = model.predict_noise(latents, torch.tensor(100), model.text_encoder.encode(["a cube"] * 4), None, 4)
    assert eps.shape == latents.shape
    assert model.decode_samples(latents).shape == (4, 3, 16, 16)
    model.save_pretrained(tmp_path / "latent")
    loaded = MultiViewDiffusionModel.from_pretrained(tmp_path / "latent")
    assert loaded.vae is not None and loaded.metadata.latent
    with torch.no_grad():
        assert torch.allclose(loaded.decode_samples(latents), model.decode_samples(latents), atol=1e-6)


def test_latent_scale_is_the_vaes_scaling_factor() -> None:
    vae = AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=8, scaling_factor=0.5,
    )
    model = MultiViewDiffusionModel.create(tiny_config(in_channels=4), TEXT, ModelMetadata(image_size=8, latent=True), vae=vae)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(1)
        latents = model.encode_images(images)
        torch.manual_seed(1)
        torch.testing.assert_close(latents, vae.encode(images).latent_dist.sample() * 0.5)
        torch.testing.assert_close(model.decode_samples(latents), vae.decode(latents / 0.5).sample)


def test_missing_or_broken_model_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        MultiViewDiffusionModel.from_pretrained(tmp_path / "nowhere")
    model = MultiViewDiffusionModel.create(tiny_config(), TEXT, ModelMetadata(image_size=8))
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match=r"missing unet/diffusion_pytorch_model.safetensors"):
        MultiViewDiffusionModel.from_pretrained(tmp_path / "model")


class RecordingModel:
    """Stands in for the model: records calls; eps = sample * (1 + text mean) + camera mean."""

    def __init__(self) -> None:
        self.calls = []

    def predict_noise(self, sample, timestep, text, camera, num_views):
        self.calls.append((sample.shape[0], timestep.clone(), camera.clone(), num_views))
        return sample * (1 + text.mean(dim=(1, 2))).view(-1, 1, 1, 1) + camera.mean(dim=1).view(-1, 1, 1, 1)


def test_cfg_helper_one_batched_call_and_mvdream_formula() -> None:
    model = RecordingModel()
    sample, camera = torch.randn(8, 3, 4, 4), torch.randn(8, 16)
    cond, uncond = torch.full((1, 2, 3), 1.0), torch.zeros(1, 2, 3)
    eps, eps_c, eps_u = predict_noise_with_cfg(model, sample, torch.tensor(700), cond, uncond, camera, 4, 7.5)
    assert len(model.calls) == 1
    batch, timesteps, cameras, views = model.calls[0]
    assert batch == 16 and views == 4 and torch.equal(cameras, torch.cat([camera, camera]))
    assert torch.all(timesteps == 700)
    expected_c = 2 * sample + camera.mean(1).view(-1, 1, 1, 1)
    expected_u = sample + camera.mean(1).view(-1, 1, 1, 1)
    assert torch.allclose(eps_c, expected_c) and torch.allclose(eps_u, expected_u)
    assert torch.allclose(eps, expected_u + 7.5 * (expected_c - expected_u))


def test_sampler_starts_from_the_marginal_at_the_first_timestep() -> None:
    from threestudio_mv.models.mvdiffusion.pipeline import sample_multiview

    model = MultiViewDiffusionModel.create(tiny_config(), TEXT, ModelMetadata(image_size=64, init_mean=[0.8, -0.5, 0.0]))
    seen = []
    model.predict_noise = lambda sample, *args: seen.append(sample[: sample.shape[0] // 2].clone()) or torch.zeros_like(sample)
    c2w = c2w_from_spherical(torch.full((8,), 15.0), torch.arange(8) * 90.0, torch.full((8,), 2.0))
    sample_multiview(model, torch.zeros(1, 4, 16), torch.zeros(1, 4, 16), c2w, 4, num_inference_steps=2, progress=False)
    scheduler = model.ddim_scheduler()
    scheduler.set_timesteps(2)
    alpha_bar = scheduler.alphas_cumprod[scheduler.timesteps[0]]
    channel_means = seen[0].mean(dim=(0, 2, 3))
    expected = alpha_bar.sqrt() * torch.tensor([0.8, -0.5, 0.0])
    assert torch.allclose(channel_means, expected, atol=0.02)
    assert torch.allclose(seen[0].std(dim=(0, 2, 3)), (1 - alpha_bar).sqrt().expand(3), atol=0.02)


def test_the_bundled_folders_parts_load_with_diffusers_alone() -> None:
    """The model folder is diffusers' layout: its UNet and scheduler load without this package's code,
    and the UNet is the model's (same weights)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from threestudio_mv.models.mvdiffusion.model import DEFAULT_MODEL_PATH

    unet = UNet2DConditionModel.from_pretrained(str(DEFAULT_MODEL_PATH), subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(str(DEFAULT_MODEL_PATH), subfolder="scheduler")
    model = MultiViewDiffusionModel.from_pretrained()
    assert scheduler.config.num_train_timesteps == model.noise_scheduler().config.num_train_timesteps
    for (name, ours), (_, theirs) in zip(model.unet.state_dict().items(), unet.state_dict().items()):
        assert torch.equal(ours, theirs), name
