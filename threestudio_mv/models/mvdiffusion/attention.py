"""Multi-view self-attention for diffusers' UNet2DConditionModel (MVDream's "3D attention").

MVDream reuses the UNet's own self-attention weights: inside every transformer block the tokens of
the F views of one object are joined, (B*F, HW, C) -> (B, F*HW, C), so that each token attends to
every view of its object. Cross-attention to the text and the feed-forward stay per view. F = 1 is
ordinary 2D attention. F reaches the processors through ``cross_attention_kwargs={"num_views": F}``
(diffusers forwards it to every processor, so every processor in the UNet accepts it).
"""
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


class MultiViewAttnProcessor:
    """Scaled-dot-product attention processor that joins the views of one object when ``multiview``.

    Installed on every ``attn1`` with ``multiview=True`` and on every ``attn2`` (cross-attention) with
    ``multiview=False``, so that both accept ``num_views``. Written here (not taken from diffusers)
    because diffusers has no processor that reshapes the batch across views.
    """

    def __init__(self, multiview: bool = True) -> None:
        self.multiview = multiview

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        num_views: int = 1,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("MultiViewAttnProcessor does not support attention masks")
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise ValueError("MultiViewAttnProcessor expects transformer-block attention on (B, N, C) tokens")
        residual = hidden_states
        joined = self.multiview and encoder_hidden_states is None and num_views > 1
        if joined:
            batch_views, tokens, channels = hidden_states.shape
            if batch_views % num_views != 0:
                raise ValueError(f"batch {batch_views} is not a multiple of num_views={num_views}")
            hidden_states = hidden_states.reshape(batch_views // num_views, num_views * tokens, channels)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        key, value = attn.to_k(context), attn.to_v(context)

        batch = query.shape[0]
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            x.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))

        if joined:
            out = out.reshape(residual.shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def multiview_processors(
    unet: torch.nn.Module, joined: Optional[Callable[[str], bool]] = None
) -> Dict[str, MultiViewAttnProcessor]:
    """A processor dict for ``unet.set_attn_processor``: multi-view on attn1, per-view elsewhere.

    ``joined(name)`` (a predicate on the processor's name, e.g. ``"down_blocks.1.attentions.0.
    transformer_blocks.0.attn1.processor"``) limits the joined attn1 to some levels (MVGenMaster and
    MVDiffusion++ join frames only at the low resolutions); None joins every attn1.
    """
    return {
        name: MultiViewAttnProcessor(multiview=name.endswith("attn1.processor") and (joined is None or joined(name)))
        for name in unet.attn_processors
    }


def per_view_processors(unet: torch.nn.Module) -> Dict[str, MultiViewAttnProcessor]:
    """Processors that ignore ``num_views`` (plain 2D attention everywhere), e.g. for benchmarks."""
    return {name: MultiViewAttnProcessor(multiview=False) for name in unet.attn_processors}
