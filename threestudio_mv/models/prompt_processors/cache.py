"""On-disk cache of text embeddings: one file per (encoder, prompt), written atomically."""
import hashlib
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from threestudio_mv.models.mvdiffusion.text_encoders import TextEncoder
from threestudio_mv.utils.io import atomic_path


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/threestudio-mv/text_embeddings`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "threestudio-mv" / "text_embeddings"


class CachedTextEncoder:
    """Wraps a frozen :class:`TextEncoder`: embeddings come from memory, then disk, then the encoder.

    The key is a hash of the encoder's id and the prompt, so different encoders never collide.
    """

    def __init__(self, encoder: TextEncoder, cache_dir: Optional[Path] = None, batch_size: int = 64) -> None:
        if encoder.trainable:
            raise ValueError("trainable text encoders change during training and cannot be cached")
        self.encoder = encoder
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.batch_size = batch_size
        self._memory: Dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def path_for(self, prompt: str) -> Path:
        key = hashlib.sha256(f"{self.encoder.cache_id}\0{prompt}".encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.pt"

    def _load(self, prompt: str) -> Optional[torch.Tensor]:
        path = self.path_for(prompt)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True).float()
        except (OSError, RuntimeError, EOFError):
            return None  # unreadable cache entry: recompute and overwrite it

    def encode(self, prompts: Sequence[str], progress: bool = False) -> torch.Tensor:
        """(B, L, D) float32 embeddings (float16 precision) on the CPU for ``prompts``."""
        missing: List[str] = []
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._memory:
                cached = self._load(prompt)
                if cached is None:
                    missing.append(prompt)
                else:
                    self._memory[prompt] = cached
        starts = range(0, len(missing), self.batch_size)
        for start in tqdm(starts, total=len(starts), desc="text embeddings", disable=not progress or not missing):
            chunk = missing[start : start + self.batch_size]
            embeddings = self.encoder.encode(chunk).detach().float().cpu()
            for prompt, embedding in zip(chunk, embeddings):
                # Stored as float16 (half the disk); the rounded value is also what is returned now,
                # so a prompt gives the same embedding whether it was cached or just computed.
                stored = embedding.half().clone()
                with atomic_path(self.path_for(prompt)) as tmp:
                    torch.save(stored, tmp)
                self._memory[prompt] = stored.float()
        return torch.stack([self._memory[prompt] for prompt in prompts])
