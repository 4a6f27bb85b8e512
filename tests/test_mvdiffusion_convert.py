"""Converting an MVDream LDM-layout checkpoint to our diffusers-layout model folder."""
import re
from pathlib import Path
from typing import Dict

import pytest
import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

from threestudio_mv.models.mvdiffusion.convert import convert_checkpoint, convert_unet, main
from threestudio_mv.models.mvdiffusion.model import ModelMetadata, MultiViewDiffusionModel
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
