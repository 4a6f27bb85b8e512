"""The registered prompt processor ``mv-prompt-processor``: prompt -> cached text embeddings."""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

from threestudio_mv import register
from threestudio_mv.models.mvdiffusion.model import load_text_encoder, read_metadata
from threestudio_mv.models.prompt_processors.cache import CachedTextEncoder
from threestudio_mv.utils.base import BaseModule
from threestudio_mv.utils.errors import UserError


@dataclass
class PromptEmbeddings:
    """Embeddings of one prompt and its negative (each (1, L, D)), plus the texts encoded."""

    cond: torch.Tensor
    uncond: torch.Tensor
    prompt: str
    negative_prompt: str

    def batch(self, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) repeated to ``size`` rows (e.g. groups x views)."""
        return self.cond.expand(size, -1, -1), self.uncond.expand(size, -1, -1)


@register("mv-prompt-processor")
class MVPromptProcessor(BaseModule):
    """Encodes ``prompt`` (+ the model's suffix) and ``negative_prompt`` with the model's own encoder.

    Frozen encoders go through the on-disk cache; call the module to get :class:`PromptEmbeddings`.
    """

    @dataclass
    class Config:
        prompt: str = ""
        negative_prompt: str = ""
        prompt_suffix: Optional[str] = None  # None: the model's suffix (e.g. ", 3d asset")
        pretrained_model_name_or_path: Optional[str] = None  # model folder; None: the bundled model
        cache_dir: Optional[str] = None  # None: $XDG_CACHE_HOME/threestudio-mv/text_embeddings
        use_cache: bool = True

    cfg: Config

    def __init__(self, cfg: Optional[Any] = None, prefix: str = "system.prompt_processor", **kwargs: Any) -> None:
        self.config_prefix = prefix or "system.prompt_processor"
        super().__init__(cfg, prefix, **kwargs)

    def configure(self) -> None:
        if not self.cfg.prompt.strip():
            raise UserError(
                f"config key '{self.config_prefix}.prompt' is empty; describe the object, "
                f"e.g. {self.config_prefix}.prompt=\"a red cube\""
            )
        encoder = load_text_encoder(self.cfg.pretrained_model_name_or_path)
        metadata = read_metadata(self.cfg.pretrained_model_name_or_path)
        suffix = self.cfg.prompt_suffix if self.cfg.prompt_suffix is not None else metadata.prompt_suffix
        self.prompt = self.cfg.prompt.strip() + suffix
        self.negative_prompt = self.cfg.negative_prompt
        with torch.no_grad():
            if self.cfg.use_cache and not encoder.trainable:
                cache = CachedTextEncoder(encoder, Path(self.cfg.cache_dir).expanduser() if self.cfg.cache_dir else None)
                embeddings = cache.encode([self.prompt, self.negative_prompt])
            else:
                embeddings = encoder.encode([self.prompt, self.negative_prompt]).detach().float()
        # Buffers (not saved in checkpoints) so they follow the module to the device.
        self.register_buffer("cond", embeddings[:1].clone(), persistent=False)
        self.register_buffer("uncond", embeddings[1:].clone(), persistent=False)

    def forward(self) -> PromptEmbeddings:
        return PromptEmbeddings(self.cond, self.uncond, self.prompt, self.negative_prompt)
