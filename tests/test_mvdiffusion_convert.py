"""Converting an MVDream LDM-layout checkpoint to our diffusers-layout model folder."""
import re
import shutil
from pathlib import Path
from typing import Dict

import pytest
import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

from threestudio_mv.models.mvdiffusion.convert import convert_checkpoint, convert_unet, convert_vae, main
from threestudio_mv.models.mvdiffusion.model import ModelMetadata, MultiViewDiffusionModel
from threestudio_mv.models.mvdiffusion.sd21 import write_clip_text_encoder
from threestudio_mv.models.mvdiffusion.unet import build_unet, unet_config

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
LAYERS_PER_BLOCK = 2


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET.get(head, head)}.{tail}"


def to_ldm_name(key: str, attention_up_levels: set) -> str:
    """Our test's own inverse of the LDM->diffusers key map, with MVDream's camera_embed names."""
    per_level = LAYERS_PER_BLOCK + 1
    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in fixed:
        return fixed[key]
    if key.startswith("class_embedding.linear_"):
        return key.replace("class_embedding.linear_1", "camera_embed.0").replace("class_embedding.linear_2", "camera_embed.2")
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * per_level + LAYERS_PER_BLOCK}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"output_blocks.{int(m[1]) * per_level + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"output_blocks.{int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        slot = 2 if int(m[1]) in attention_up_levels else 1
        return f"output_blocks.{int(m[1]) * per_level + LAYERS_PER_BLOCK}.{slot}.conv.{m[2]}"
    raise AssertionError(f"no LDM name for {key}")


@pytest.fixture
def source_unet():
    """A reduced SD-2-style multi-view UNet (linear projections, 16-channel heads, 32 norm groups
    as in every LDM UNet), random weights."""
    config = unet_config(
        sample_size=8, in_channels=4, block_out_channels=(32, 64, 64), attention_levels=(True, True, False),
        layers_per_block=LAYERS_PER_BLOCK, cross_attention_dim=24, norm_num_groups=32,
    )
    config.update(use_linear_projection=True, attention_head_dim=[2, 4, 4])  # 16 channels per head
    unet = build_unet(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return unet


@pytest.fixture
def tiny_clip(tmp_path: Path) -> Path:
    """A random CLIP text encoder + tokenizer folder (diffusers layout), context width 24."""
    return write_clip_text_encoder(tmp_path / "clip", hidden_size=24, layers=2, heads=2)


def ldm_checkpoint(unet) -> Dict[str, torch.Tensor]:
    up_types = unet.config.up_block_types
    attention_up = {i for i, kind in enumerate(up_types) if kind.startswith("CrossAttn")}
    checkpoint = {"model.diffusion_model." + to_ldm_name(k, attention_up): v.clone() for k, v in unet.state_dict().items()}
    checkpoint["cond_stage_model.model.token_embedding.weight"] = torch.zeros(2, 2)  # ignored parts of the file
    return checkpoint


def test_every_key_maps_and_outputs_match(source_unet) -> None:
    checkpoint = ldm_checkpoint(source_unet)
    config, state = convert_unet(checkpoint, image_size=8, latent_factor=1, num_head_channels=16)
    assert config["class_embed_type"] == "projection" and config["projection_class_embeddings_input_dim"] == 16
    assert config["block_out_channels"] == [32, 64, 64] and config["cross_attention_dim"] == 24
    assert set(state) == set(source_unet.state_dict())  # no missing, no unexpected keys
    for key, value in source_unet.state_dict().items():
        assert torch.equal(state[key], value), key
    converted = build_unet(config, state)
    sample, text, camera = torch.randn(4, 4, 8, 8), torch.randn(4, 3, 24), torch.randn(4, 16)
    kwargs = {"class_labels": camera, "cross_attention_kwargs": {"num_views": 4}}
    with torch.no_grad():
        expected = source_unet(sample, torch.tensor(400), text, **kwargs).sample
        assert torch.allclose(converted(sample, torch.tensor(400), text, **kwargs).sample, expected, atol=1e-5)


def test_convert_checkpoint_to_model_folder(source_unet, tmp_path: Path) -> None:
    spec = {"type": "learned", "words": ["a"], "dim": 24, "max_length": 3}
    model = convert_checkpoint(ldm_checkpoint(source_unet), spec, None, image_size=8, num_head_channels=16,
                               metadata=ModelMetadata(image_size=8))
    model.save_pretrained(tmp_path / "converted")
    loaded = MultiViewDiffusionModel.from_pretrained(tmp_path / "converted")
    for key, value in source_unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[key], value), key


def test_plain_sd_checkpoint_is_rejected(source_unet, tmp_path: Path, capsys) -> None:
    checkpoint = {k: v for k, v in ldm_checkpoint(source_unet).items() if "camera_embed" not in k}
    torch.save({"state_dict": checkpoint}, tmp_path / "sd.ckpt")
    (tmp_path / "clip").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", str(tmp_path / "sd.ckpt"), "--out", str(tmp_path / "out"), "--clip", str(tmp_path / "clip")])
    assert exit_info.value.code == 2 and "config.json" in capsys.readouterr().err


# -- a checkpoint written down from the official definition ------------------------------------------------
# Key names and shapes follow MVDream's MultiViewUNetModel (mvdream/ldm/modules/diffusionmodules/openaimodel.py,
# SpatialTransformer3D in mvdream/ldm/modules/attention.py) and LDM's AutoencoderKL Encoder/Decoder
# (first_stage_model), with the SD-2.1-base settings (channel_mult 1,2,4,4 -> here 1,2,2,2; attention at
# downsampling 1, 2, 4; 2 res blocks; linear proj_in/out; heads of num_head_channels) at tiny widths.
# Written independently of the converter's key map: only the official module tree is walked.
OFFICIAL_UNET = {"model_channels": 32, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2, "attention_resolutions": (4, 2, 1),
                 "num_head_channels": 16, "context_dim": 24, "in_channels": 4, "camera_dim": 16}
OFFICIAL_VAE = {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "z_channels": 4}


def _linear(shapes: Dict[str, tuple], name: str, n_in: int, n_out: int, bias: bool = True) -> None:
    shapes[f"{name}.weight"] = (n_out, n_in)
    if bias:
        shapes[f"{name}.bias"] = (n_out,)


def _conv(shapes: Dict[str, tuple], name: str, n_in: int, n_out: int, kernel: int = 3) -> None:
    shapes[f"{name}.weight"] = (n_out, n_in, kernel, kernel)
    shapes[f"{name}.bias"] = (n_out,)


def _norm(shapes: Dict[str, tuple], name: str, channels: int) -> None:
    shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (channels,)


def _official_resblock(shapes: Dict[str, tuple], name: str, n_in: int, n_out: int, emb: int) -> None:
    """ResBlock: in_layers (GroupNorm, SiLU, conv), emb_layers (SiLU, Linear), out_layers (GroupNorm, SiLU,
    Dropout, conv), a 1x1 skip_connection when the width changes."""
    _norm(shapes, f"{name}.in_layers.0", n_in)
    _conv(shapes, f"{name}.in_layers.2", n_in, n_out)
    _linear(shapes, f"{name}.emb_layers.1", emb, n_out)
    _norm(shapes, f"{name}.out_layers.0", n_out)
    _conv(shapes, f"{name}.out_layers.3", n_out, n_out)
    if n_in != n_out:
        _conv(shapes, f"{name}.skip_connection", n_in, n_out, kernel=1)


def _official_transformer(shapes: Dict[str, tuple], name: str, channels: int, context: int) -> None:
    """SpatialTransformer3D with linear proj_in/out, one BasicTransformerBlock3D (attn1 over the views,
    attn2 to the text, GEGLU feed-forward)."""
    _norm(shapes, f"{name}.norm", channels)
    _linear(shapes, f"{name}.proj_in", channels, channels)
    block = f"{name}.transformer_blocks.0"
    for attn, kv_dim in (("attn1", channels), ("attn2", context)):
        _linear(shapes, f"{block}.{attn}.to_q", channels, channels, bias=False)
        _linear(shapes, f"{block}.{attn}.to_k", kv_dim, channels, bias=False)
        _linear(shapes, f"{block}.{attn}.to_v", kv_dim, channels, bias=False)
        _linear(shapes, f"{block}.{attn}.to_out.0", channels, channels)
    _linear(shapes, f"{block}.ff.net.0.proj", channels, channels * 4 * 2)
    _linear(shapes, f"{block}.ff.net.2", channels * 4, channels)
    for norm in ("norm1", "norm2", "norm3"):
        _norm(shapes, f"{block}.{norm}", channels)
    _linear(shapes, f"{name}.proj_out", channels, channels)


def official_unet_shapes(model_channels: int, channel_mult, num_res_blocks: int, attention_resolutions, num_head_channels: int,
                         context_dim: int, in_channels: int, camera_dim: int) -> Dict[str, tuple]:
    """Every ``model.diffusion_model.*`` key of MVDream's MultiViewUNetModel and its shape."""
    del num_head_channels  # heads change no shape: they split the channels
    shapes: Dict[str, tuple] = {}
    emb = model_channels * 4
    _linear(shapes, "time_embed.0", model_channels, emb)
    _linear(shapes, "time_embed.2", emb, emb)
    _linear(shapes, "camera_embed.0", camera_dim, emb)
    _linear(shapes, "camera_embed.2", emb, emb)
    _conv(shapes, "input_blocks.0.0", in_channels, model_channels)
    skips, width, downsample, block = [model_channels], model_channels, 1, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            _official_resblock(shapes, f"input_blocks.{block}.0", width, mult * model_channels, emb)
            width = mult * model_channels
            if downsample in attention_resolutions:
                _official_transformer(shapes, f"input_blocks.{block}.1", width, context_dim)
            skips.append(width)
            block += 1
        if level != len(channel_mult) - 1:
            _conv(shapes, f"input_blocks.{block}.0.op", width, width)
            skips.append(width)
            downsample *= 2
            block += 1
    _official_resblock(shapes, "middle_block.0", width, width, emb)
    _official_transformer(shapes, "middle_block.1", width, context_dim)
    _official_resblock(shapes, "middle_block.2", width, width, emb)
    block = 0
    for level, mult in reversed(list(enumerate(channel_mult))):
        for index in range(num_res_blocks + 1):
            _official_resblock(shapes, f"output_blocks.{block}.0", width + skips.pop(), model_channels * mult, emb)
            width = model_channels * mult
            slot = 1
            if downsample in attention_resolutions:
                _official_transformer(shapes, f"output_blocks.{block}.1", width, context_dim)
                slot = 2
            if level and index == num_res_blocks:
                _conv(shapes, f"output_blocks.{block}.{slot}.conv", width, width)
                downsample //= 2
            block += 1
    _norm(shapes, "out.0", width)
    _conv(shapes, "out.2", model_channels, in_channels)
    return {"model.diffusion_model." + key: shape for key, shape in shapes.items()}


def _official_vae_resnet(shapes: Dict[str, tuple], name: str, n_in: int, n_out: int) -> None:
    _norm(shapes, f"{name}.norm1", n_in)
    _conv(shapes, f"{name}.conv1", n_in, n_out)
    _norm(shapes, f"{name}.norm2", n_out)
    _conv(shapes, f"{name}.conv2", n_out, n_out)
    if n_in != n_out:
        _conv(shapes, f"{name}.nin_shortcut", n_in, n_out, kernel=1)


def _official_vae_mid(shapes: Dict[str, tuple], name: str, width: int) -> None:
    _official_vae_resnet(shapes, f"{name}.block_1", width, width)
    _norm(shapes, f"{name}.attn_1.norm", width)
    for conv in ("q", "k", "v", "proj_out"):
        _conv(shapes, f"{name}.attn_1.{conv}", width, width, kernel=1)
    _official_vae_resnet(shapes, f"{name}.block_2", width, width)


def official_vae_shapes(ch: int, ch_mult, num_res_blocks: int, z_channels: int) -> Dict[str, tuple]:
    """Every ``first_stage_model.*`` key of LDM's AutoencoderKL (double_z encoder, RGB) and its shape."""
    shapes: Dict[str, tuple] = {}
    _conv(shapes, "encoder.conv_in", 3, ch)
    width = ch
    for level, mult in enumerate(ch_mult):
        for index in range(num_res_blocks):
            _official_vae_resnet(shapes, f"encoder.down.{level}.block.{index}", width, ch * mult)
            width = ch * mult
        if level != len(ch_mult) - 1:
            _conv(shapes, f"encoder.down.{level}.downsample.conv", width, width)
    _official_vae_mid(shapes, "encoder.mid", width)
    _norm(shapes, "encoder.norm_out", width)
    _conv(shapes, "encoder.conv_out", width, 2 * z_channels)
    _conv(shapes, "quant_conv", 2 * z_channels, 2 * z_channels, kernel=1)
    _conv(shapes, "post_quant_conv", z_channels, z_channels, kernel=1)
    width = ch * ch_mult[-1]
    _conv(shapes, "decoder.conv_in", z_channels, width)
    _official_vae_mid(shapes, "decoder.mid", width)
    for level in reversed(range(len(ch_mult))):
        for index in range(num_res_blocks + 1):
            _official_vae_resnet(shapes, f"decoder.up.{level}.block.{index}", width, ch * ch_mult[level])
            width = ch * ch_mult[level]
        if level != 0:
            _conv(shapes, f"decoder.up.{level}.upsample.conv", width, width)
    _norm(shapes, "decoder.norm_out", width)
    _conv(shapes, "decoder.conv_out", width, 3)
    return {"first_stage_model." + key: shape for key, shape in shapes.items()}


def official_checkpoint() -> Dict[str, torch.Tensor]:
    """Random weights under the official key names (+ text-encoder and schedule entries the converter skips)."""
    generator = torch.Generator().manual_seed(0)
    shapes = {**official_unet_shapes(**OFFICIAL_UNET), **official_vae_shapes(**OFFICIAL_VAE)}
    checkpoint = {key: torch.randn(shape, generator=generator) * 0.05 for key, shape in shapes.items()}
    checkpoint["cond_stage_model.model.token_embedding.weight"] = torch.zeros(2, 2)
    checkpoint["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    return checkpoint


def test_official_key_layout_converts_completely() -> None:
    checkpoint = official_checkpoint()
    config, state = convert_unet(checkpoint, image_size=16, latent_factor=2, num_head_channels=16)
    unet_keys = [key for key in checkpoint if key.startswith("model.diffusion_model.")]
    assert len(state) == len(unet_keys)  # every official tensor has a place, and only one
    assert config["block_out_channels"] == [32, 64, 64, 64] and config["layers_per_block"] == 2
    assert config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert config["cross_attention_dim"] == 24 and config["attention_head_dim"] == [2, 4, 4, 4]
    assert torch.equal(state["class_embedding.linear_1.weight"], checkpoint["model.diffusion_model.camera_embed.0.weight"])
    assert torch.equal(state["time_embedding.linear_2.weight"], checkpoint["model.diffusion_model.time_embed.2.weight"])
    assert torch.equal(state["conv_out.weight"], checkpoint["model.diffusion_model.out.2.weight"])
    to_q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(state["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"], checkpoint[to_q])
    vae = convert_vae(checkpoint, image_size=16)
    assert list(vae.config.block_out_channels) == [32, 64] and vae.config.latent_channels == 4
    assert vae.config.scaling_factor == 0.18215
    assert torch.equal(vae.encoder.conv_in.weight, checkpoint["first_stage_model.encoder.conv_in.weight"])


def test_official_checkpoint_converts_with_cli_to_a_self_contained_folder(tmp_path: Path, tiny_clip: Path) -> None:
    torch.save({"state_dict": official_checkpoint()}, tmp_path / "mvdream.ckpt")
    main(["--ckpt", str(tmp_path / "mvdream.ckpt"), "--out", str(tmp_path / "out"), "--clip", str(tiny_clip),
          "--image-size", "16", "--head-channels", "16"])
    moved = tmp_path / "moved"
    (tmp_path / "out").rename(moved)  # nothing may point back at the source folders
    shutil.rmtree(tiny_clip)
    model = MultiViewDiffusionModel.from_pretrained(moved)
    assert model.metadata.latent and model.sample_size == 8 and model.metadata.prompt_suffix == ", 3d asset"
    encoder = model.build_text_encoder()
    assert Path(encoder.spec()["path"]) == moved.resolve()
    text = encoder.encode(["a red cube"])
    sample = torch.randn(4, 4, 8, 8)
    with torch.no_grad():
        eps = model.predict_noise(sample, torch.tensor(500), text.expand(4, -1, -1), torch.randn(4, 16), num_views=4)
    assert eps.shape == sample.shape and torch.isfinite(eps).all()


def test_unexpected_checkpoint_keys_are_one_line_exit_2(tmp_path: Path, tiny_clip: Path, capsys) -> None:
    checkpoint = official_checkpoint()
    extra = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k_ip.weight"  # ImageDream's
    checkpoint[extra] = torch.zeros(32, 24)
    torch.save(checkpoint, tmp_path / "imagedream.pt")
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", str(tmp_path / "imagedream.pt"), "--out", str(tmp_path / "out"), "--clip", str(tiny_clip),
              "--image-size", "16", "--head-channels", "16"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: the checkpoint's UNet does not match MVDream's architecture: 1 unexpected tensors ({extra})"
    assert not (tmp_path / "out").exists()
