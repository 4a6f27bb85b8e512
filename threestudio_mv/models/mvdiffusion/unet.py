"""Building the multi-view UNet: diffusers' UNet2DConditionModel + camera embedding + 3D attention."""
from typing import Any, Dict, Optional, Sequence

import torch
from diffusers import UNet2DConditionModel

from threestudio_mv.models.mvdiffusion.attention import multiview_processors

CAMERA_DIM = 16  # MVDream's camera condition: a flattened 4x4 camera-to-world matrix


def unet_config(
    sample_size: int = 32,
    in_channels: int = 3,
    block_out_channels: Sequence[int] = (32, 64, 64),
    attention_levels: Sequence[bool] = (False, True, True),
    layers_per_block: int = 1,
    cross_attention_dim: int = 384,
    num_attention_heads: int = 2,
    norm_num_groups: int = 32,
) -> Dict[str, Any]:
    """A diffusers UNet2DConditionModel config with MVDream's camera embedding.

    ``attention_levels[i]`` puts transformer blocks (self-attention across views, cross-attention to
    text) at resolution level i; the camera condition enters through ``class_embed_type="projection"``
    (an MLP of the 16 numbers added to the timestep embedding).
    """
    if len(attention_levels) != len(block_out_channels):
        raise ValueError("attention_levels needs one entry per block_out_channels entry")
    down = ["CrossAttnDownBlock2D" if attend else "DownBlock2D" for attend in attention_levels]
    up = ["CrossAttnUpBlock2D" if attend else "UpBlock2D" for attend in reversed(attention_levels)]
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": layers_per_block,
        "cross_attention_dim": cross_attention_dim,
        # diffusers' legacy name: for this class "attention_head_dim" is the number of heads.
        "attention_head_dim": num_attention_heads,
        "norm_num_groups": norm_num_groups,
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": CAMERA_DIM,
    }


def install_multiview_attention(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Put the multi-view processor on every attn1 (and a num_views-aware one on every attn2)."""
    unet.set_attn_processor(multiview_processors(unet))
    return unet


def build_unet(config: Dict[str, Any], state_dict: Optional[Dict[str, torch.Tensor]] = None) -> UNet2DConditionModel:
    """A multi-view UNet from a config dict (see :func:`unet_config`), optionally with weights."""
    if config.get("class_embed_type") != "projection" or config.get("projection_class_embeddings_input_dim") != CAMERA_DIM:
        raise ValueError("a multi-view UNet needs class_embed_type='projection' with 16 inputs (the camera)")
    unet = UNet2DConditionModel(**config)
    if state_dict is not None:
        unet.load_state_dict(state_dict, strict=True)
    return install_multiview_attention(unet)
