"""Convert an official MVDream checkpoint (LDM layout, e.g. ``sd-v2.1-base-4view.pt``) to a model folder.

    python -m threestudio_mv.models.mvdiffusion.convert --ckpt sd-v2.1-base-4view.pt --out DIR \
        --clip SD21_TEXT_ENCODER_DIR [--vae ckpt|DIR|none]

The UNet keys go through diffusers' own LDM->diffusers converter
(``diffusers.loaders.single_file_utils``); MVDream's camera MLP ``camera_embed.0/2`` becomes
``class_embedding.linear_1/2`` (``class_embed_type="projection"``). The architecture is read from the
tensor shapes, so reduced configurations convert too (GroupNorm groups cannot be read from weights:
32, as in every LDM UNet). The multi-view attention reuses the UNet's own
attn1 weights, so nothing else changes. The OpenCLIP text encoder inside the checkpoint is not
converted: pass a local CLIPTextModel folder (SD-2.1's ``text_encoder``/``tokenizer``, e.g. a download of
``stabilityai/stable-diffusion-2-1-base``) as ``--clip``; it is copied into the model folder, which is then
self-contained. A checkpoint with tensors this conversion has no place for is refused, naming them.
"""
import argparse
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)

from threestudio_mv.models.mvdiffusion.model import ModelMetadata, MultiViewDiffusionModel, sd_scheduler_config
from threestudio_mv.models.mvdiffusion.unet import CAMERA_DIM, build_unet
from threestudio_mv.utils.errors import UserError, exit_on_user_error

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CAMERA_KEYS = {"camera_embed.0.": "label_emb.0.0.", "camera_embed.2.": "label_emb.0.2."}


def _count(keys: List[str], pattern: str) -> int:
    return len({match.group(1) for key in keys for match in [re.match(pattern, key)] if match})


def infer_ldm_unet_params(unet: Dict[str, torch.Tensor], num_head_channels: int = 64, num_heads: int = 8) -> Dict[str, Any]:
    """LDM ``unet_config.params`` read from the tensor shapes of a UNet state dict (prefix removed).

    Heads cannot be read from weights: SD-2-style (linear proj_in) UNets use ``num_head_channels``
    (MVDream: 64), SD-1-style ones ``num_heads``.
    """
    keys = list(unet)
    model_channels, in_channels = unet["input_blocks.0.0.weight"].shape[:2]
    n_input = _count(keys, r"input_blocks\.(\d+)\.")
    n_levels = _count(keys, r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    res_blocks = (n_input - 1 - (n_levels - 1)) // n_levels
    channel_mult, attention_resolutions = [], []
    for level in range(n_levels):
        first = 1 + level * (res_blocks + 1)
        channel_mult.append(unet[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // model_channels)
        if any(key.startswith(f"input_blocks.{first}.1.") for key in keys):
            attention_resolutions.append(2**level)
    context = [unet[key].shape[1] for key in keys if key.endswith("attn2.to_k.weight")]
    proj_in = [unet[key] for key in keys if key.endswith(".proj_in.weight")]
    linear = bool(proj_in) and proj_in[0].ndim == 2
    depth = _count([k for k in keys if k.startswith("middle_block.1.")], r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    params: Dict[str, Any] = {
        "in_channels": int(in_channels),
        "out_channels": int(unet["out.2.weight"].shape[0]),
        "model_channels": int(model_channels),
        "channel_mult": channel_mult,
        "num_res_blocks": res_blocks,
        "attention_resolutions": attention_resolutions,
        "context_dim": int(context[0]) if context else None,
        "use_linear_in_transformer": linear,
        "transformer_depth": max(depth, 1),
    }
    if linear:
        params["num_head_channels"] = num_head_channels
    else:
        params["num_heads"] = num_heads
    return params


def convert_unet(
    checkpoint: Dict[str, torch.Tensor], image_size: int = 256, latent_factor: int = 8, num_head_channels: int = 64, num_heads: int = 8
) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(diffusers UNet config, diffusers state dict) from an MVDream LDM checkpoint's state dict.

    Raises UserError if a source tensor is left over or a UNet parameter is not filled.
    """
    unet = {key[len(UNET_PREFIX):]: value for key, value in checkpoint.items() if key.startswith(UNET_PREFIX)}
    if "input_blocks.0.0.weight" not in unet:
        raise UserError(f"the checkpoint has no '{UNET_PREFIX}*' UNet weights; is it an MVDream/LDM checkpoint?")
    if "camera_embed.0.weight" not in unet:
        raise UserError("the checkpoint has no camera_embed weights; it is a plain SD UNet, not MVDream's")
    for old, new in CAMERA_KEYS.items():
        for key in [k for k in unet if k.startswith(old)]:
            unet[new + key[len(old):]] = unet.pop(key)
    params = infer_ldm_unet_params(unet, num_head_channels, num_heads)
    n_levels = len(params["channel_mult"])
    original_config = {
        "model": {
            "params": {
                "unet_config": {"params": params},
                # Only its depth is read: the latent downsampling factor.
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1] * (latent_factor.bit_length())}}},
            }
        }
    }
    config = create_unet_diffusers_config_from_ldm(original_config, {})
    config.update(
        sample_size=image_size // latent_factor, class_embed_type="projection", projection_class_embeddings_input_dim=CAMERA_DIM
    )
    if len(config["down_block_types"]) != n_levels:
        raise UserError("could not read the UNet's levels from the checkpoint")
    try:
        converted = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in unet.items()}, config)
    except KeyError as error:
        raise UserError(f"the checkpoint's UNet lacks '{UNET_PREFIX}{error.args[0]}'; is it an MVDream checkpoint?") from None
    _refuse_leftovers("UNet", checkpoint, UNET_PREFIX, converted, build_unet(config).state_dict())
    return config, converted


def _refuse_leftovers(
    part: str, checkpoint: Dict[str, torch.Tensor], prefix: str, converted: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]
) -> None:
    """One-line UserError naming the first ``prefix`` tensors of ``checkpoint`` that found no place among the
    ``expected`` parameters (converted tensors are the source tensors or views of them) and the parameters left
    unfilled."""
    placed = {converted[key].untyped_storage().data_ptr() for key in expected.keys() & converted.keys()}
    unexpected = sorted(k for k, v in checkpoint.items() if k.startswith(prefix) and v.untyped_storage().data_ptr() not in placed)
    missing = sorted(expected.keys() - converted.keys())
    problems = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                for what, names in (("unexpected tensors", unexpected), ("parameters missing", missing)) if names]
    if problems:
        raise UserError(f"the checkpoint's {part} does not match MVDream's architecture: {'; '.join(problems)}")


def convert_vae(checkpoint: Dict[str, torch.Tensor], image_size: int = 256) -> Optional[AutoencoderKL]:
    """SD's VAE from the checkpoint's ``first_stage_model.*`` (None if there is none)."""
    vae = {key[len(VAE_PREFIX):]: value for key, value in checkpoint.items() if key.startswith(VAE_PREFIX)}
    if not vae:
        return None
    ch = vae["encoder.conv_in.weight"].shape[0]
    n_levels = _count(list(vae), r"encoder\.down\.(\d+)\.")
    ddconfig = {
        "ch": int(ch),
        "ch_mult": [int(vae[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch) for i in range(n_levels)],
        "num_res_blocks": _count(list(vae), r"encoder\.down\.0\.block\.(\d+)\."),
        "z_channels": int(vae["decoder.conv_in.weight"].shape[1]),
        "in_channels": int(vae["encoder.conv_in.weight"].shape[1]),
        "out_ch": int(vae["decoder.conv_out.weight"].shape[0]),
    }
    original_config = {"model": {"params": {"first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
    config = create_vae_diffusers_config_from_ldm(original_config, {})  # SD's scaling factor, 0.18215
    config["sample_size"] = image_size
    model = AutoencoderKL(**config)
    state = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in vae.items()}, config)
    _refuse_leftovers("VAE", checkpoint, VAE_PREFIX, state, model.state_dict())
    model.load_state_dict(state, strict=True)
    return model


def convert_checkpoint(
    checkpoint: Dict[str, torch.Tensor],
    text_encoder_spec: Dict[str, Any],
    vae: Optional[AutoencoderKL],
    image_size: int = 256,
    num_head_channels: int = 64,
    num_heads: int = 8,
    metadata: Optional[ModelMetadata] = None,
) -> MultiViewDiffusionModel:
    """A :class:`MultiViewDiffusionModel` from an MVDream state dict (pixel space when ``vae`` is None)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    config, state = convert_unet(checkpoint, image_size, factor, num_head_channels, num_heads)
    metadata = metadata or ModelMetadata(
        image_size=image_size, latent=vae is not None, prompt_suffix=", 3d asset", default_fovy=40.0,
        default_elevation=15.0, relative_distance=0.9, guidance_scale=7.5, num_inference_steps=50,
        description="converted from an official MVDream checkpoint",
    )
    return MultiViewDiffusionModel(build_unet(config, state), sd_scheduler_config(), text_encoder_spec, metadata, vae=vae)


def load_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A checkpoint's state dict (``.pt``/``.ckpt`` with or without a ``state_dict`` key, or safetensors)."""
    if not path.is_file():
        raise UserError(f"--ckpt '{path}' not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint.get("state_dict", checkpoint)


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="MVDream checkpoint (LDM layout)")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--clip", default=None, help="local CLIPTextModel folder (SD-2.1 text_encoder + tokenizer)")
    parser.add_argument("--vae", default="ckpt", help="'ckpt' (from the checkpoint), a diffusers VAE folder, or 'none' (pixel space)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--head-channels", type=int, default=64, help="channels per attention head (SD-2 style)")
    parser.add_argument("--num-heads", type=int, default=8, help="heads per attention layer (SD-1 style)")
    args = parser.parse_args(argv)
    if args.clip is None:
        raise UserError("--clip is required: a local folder with SD-2.1's CLIP text encoder (text_encoder/ and tokenizer/)")
    from threestudio_mv.models.mvdiffusion.text_encoders import CLIPTextEncoder

    spec = CLIPTextEncoder(str(Path(args.clip).expanduser().resolve())).spec()  # checks the folder loads
    checkpoint = load_state_dict(Path(args.ckpt).expanduser())
    if args.vae == "none":
        vae = None
    elif args.vae == "ckpt":
        vae = convert_vae(checkpoint, args.image_size)
        if vae is None:
            raise UserError("--vae ckpt: the checkpoint has no first_stage_model.* weights; pass a VAE folder or --vae none")
    else:
        if not (Path(args.vae) / "config.json").is_file():
            raise UserError(f"--vae '{args.vae}' is not a diffusers AutoencoderKL folder (no config.json)")
        vae = AutoencoderKL.from_pretrained(args.vae, low_cpu_mem_usage=False)
    model = convert_checkpoint(checkpoint, spec, vae, args.image_size, args.head_channels, args.num_heads)
    model.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
