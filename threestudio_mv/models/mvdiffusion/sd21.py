"""MVDream's SD-2.1-base architecture as model folders with random weights, at full or reduced width.

For what needs the official model's classes, config keys and (at full width) sizes without its
weights: the CPU run of ``configs/mvdream-sd21.yaml`` in the tests and ``bench/gpu.py``. The CLIP
tokenizer is written offline (a byte-level vocabulary without merges), so nothing is downloaded.
"""
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

from diffusers import AutoencoderKL
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from threestudio_mv.models.mvdiffusion.model import ModelMetadata, MultiViewDiffusionModel
from threestudio_mv.models.mvdiffusion.unet import unet_config

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


@dataclass
class SD21Size:
    """Widths of the architecture; the defaults are SD-2.1-base's (MVDream's ``sd-v2-base.yaml``)."""

    model_channels: int = 320
    channel_mult: Tuple[int, ...] = (1, 2, 4, 4)
    head_channels: int = 64
    layers_per_block: int = 2
    context_dim: int = 1024  # the CLIP text encoder's width
    vae_channels: Tuple[int, ...] = (128, 256, 512, 512)
    vae_layers_per_block: int = 2
    clip_layers: int = 23  # SD-2.1's text encoder: OpenCLIP ViT-H without its last layer
    clip_heads: int = 16
    image_size: int = 256


#: A width at which the whole recipe runs on a CPU in seconds (tests, ``bench/gpu.py --smoke``).
TINY = SD21Size(model_channels=32, channel_mult=(1, 2, 2, 2), head_channels=16, layers_per_block=1, context_dim=32,
                vae_channels=(32, 32), vae_layers_per_block=1, clip_layers=2, clip_heads=2, image_size=32)


def write_clip_text_encoder(folder: Path, hidden_size: int, layers: int, heads: int) -> Path:
    """A random CLIPTextModel in ``folder/text_encoder`` and a CLIPTokenizer in ``folder/tokenizer``.

    The tokenizer's vocabulary is every byte (and every byte ending a word) with no merges: text is
    tokenized character by character, offline.
    """
    folder = Path(folder)
    characters = sorted(ByteLevel.alphabet())
    vocabulary = {token: index for index, token in enumerate(characters + [c + "</w>" for c in characters] + list(SPECIAL_TOKENS))}
    tokenizer = CLIPTokenizer(vocab=vocabulary, merges=[], pad_token="!")
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    config = CLIPTextConfig(
        vocab_size=len(vocabulary), hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act="gelu", projection_dim=hidden_size,
        bos_token_id=vocabulary[SPECIAL_TOKENS[0]], eos_token_id=vocabulary[SPECIAL_TOKENS[1]], pad_token_id=tokenizer.pad_token_id,
    )
    CLIPTextModel(config).save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    return folder


def sd21_unet_config(size: SD21Size) -> dict:
    """The diffusers config of MVDream's UNet (SD-2.1-base: linear projections, heads of ``head_channels``)."""
    widths = [size.model_channels * mult for mult in size.channel_mult]
    config = unet_config(
        sample_size=size.image_size // 2 ** (len(size.vae_channels) - 1), in_channels=4, block_out_channels=widths,
        attention_levels=[True] * (len(widths) - 1) + [False], layers_per_block=size.layers_per_block,
        cross_attention_dim=size.context_dim,
    )
    config.update(use_linear_projection=True, attention_head_dim=[width // size.head_channels for width in widths])
    return config


def random_sd21_model(folder: Path, size: SD21Size = TINY) -> Path:
    """Write a random-weight latent MVDream model folder (UNet with the camera MLP, SD's VAE, CLIP)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.clip.", dir=folder.parent) as clip:
        write_clip_text_encoder(Path(clip), size.context_dim, size.clip_layers, size.clip_heads)
        return _random_model(Path(clip), size).save_pretrained(folder)


def _random_model(clip: Path, size: SD21Size) -> MultiViewDiffusionModel:
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=list(size.vae_channels),
        down_block_types=["DownEncoderBlock2D"] * len(size.vae_channels), up_block_types=["UpDecoderBlock2D"] * len(size.vae_channels),
        layers_per_block=size.vae_layers_per_block, norm_num_groups=32, sample_size=size.image_size, scaling_factor=0.18215,
    )
    metadata = ModelMetadata(image_size=size.image_size, latent=True, prompt_suffix=", 3d asset", guidance_scale=7.5,
                             relative_distance=0.9, description="random weights (SD-2.1-base MVDream architecture)")
    return MultiViewDiffusionModel.create(sd21_unet_config(size), {"type": "clip", "path": str(clip.resolve())}, metadata, vae=vae)
