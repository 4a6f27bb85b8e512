"""Text encoders, the embedding cache and the registered prompt processor."""
from pathlib import Path

import pytest
import torch

import threestudio_mv
from threestudio_mv.models.mvdiffusion.model import ModelMetadata, MultiViewDiffusionModel
from threestudio_mv.models.mvdiffusion.sd21 import write_clip_text_encoder
from threestudio_mv.models.mvdiffusion.text_encoders import (
    CLIPTextEncoder,
    LearnedTextEncoder,
    MiniLMTextEncoder,
    TextEncoder,
    build_text_encoder,
)
from threestudio_mv.models.mvdiffusion.unet import unet_config
from threestudio_mv.models.prompt_processors.cache import CachedTextEncoder, default_cache_dir
from threestudio_mv.utils.errors import UserError

TEXT = {"type": "learned", "words": ["a", "red", "cube"], "dim": 16, "max_length": 4}


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    config = unet_config(sample_size=8, block_out_channels=(16, 32), attention_levels=(True, True), cross_attention_dim=16, norm_num_groups=8)
    model = MultiViewDiffusionModel.create(config, TEXT, ModelMetadata(image_size=8, prompt_suffix=", 3d asset"))
    return model.save_pretrained(tmp_path / "model")


def test_learned_encoder_known_and_hashed_words() -> None:
    encoder = LearnedTextEncoder(["red", "cube"], dim=8, max_length=5, hash_buckets=4)
    ids = encoder.token_ids(["A red CUBE!", "a zebra"])
    assert ids[0, 1] == encoder.word_ids["red"] and ids[0, 2] == encoder.word_ids["cube"]
    assert ids[0, 3:].eq(0).all()  # padding
    assert ids[1, 1] == encoder.token_ids(["zebra"])[0, 0] > len(encoder.words)  # stable hash bucket
    assert encoder.encode(["a red cube"]).shape == (1, 5, 8)


class CountingEncoder(TextEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.dim, self.max_length, self.calls = 3, 2, 0

    def spec(self) -> dict:
        return {"type": "counting"}

    def encode(self, prompts):
        self.calls += 1
        return torch.stack([torch.full((2, 3), float(len(p))) / 3 for p in prompts])


def test_cache_hits_memory_then_disk(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    first = CachedTextEncoder(encoder, tmp_path).encode(["ab", "abcd", "ab"])
    assert encoder.calls == 1 and first.shape == (3, 2, 3)
    assert torch.equal(first[0], first[2])
    again = CachedTextEncoder(encoder, tmp_path).encode(["abcd"])  # a fresh wrapper reads the disk
    assert encoder.calls == 1 and torch.equal(again[0], first[1])
    assert len(list(tmp_path.rglob("*.pt"))) == 2 and not list(tmp_path.rglob(".*"))


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "threestudio-mv" / "text_embeddings"


def test_minilm_encoder_offline_per_token_features() -> None:
    encoder = build_text_encoder({"type": "minilm", "max_length": 12})
    assert isinstance(encoder, MiniLMTextEncoder) and encoder.dim == 384
    features = encoder.encode(["a red torus", "a crimson doughnut", "a blue cube"])
    assert features.shape == (3, 12, 384)
    pooled = torch.nn.functional.normalize(features.mean(1), dim=-1)
    assert not torch.allclose(features[0], features[2])
    assert pooled[0] @ pooled[1] > 0.0


def test_minilm_cached_prompts_need_no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt found in the embedding cache is served without loading MiniLM (or needing its package)."""
    CachedTextEncoder(build_text_encoder({"type": "minilm", "max_length": 12}), tmp_path).encode(["a red cube"])
    fresh = build_text_encoder({"type": "minilm", "max_length": 12})
    monkeypatch.setattr(MiniLMTextEncoder, "_load", lambda self: pytest.fail("MiniLM loaded for a cached prompt"))
    assert CachedTextEncoder(fresh, tmp_path).encode(["a red cube"]).shape == (1, 12, 384)
    with pytest.raises(pytest.fail.Exception, match="MiniLM loaded"):
        CachedTextEncoder(fresh, tmp_path).encode(["a blue cone"])


def test_clip_encoder_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no config.json"):
        CLIPTextEncoder(str(tmp_path / "no-clip"))


def test_clip_encoder_returns_last_hidden_state(tmp_path: Path) -> None:
    """SD-2.x's diffusers text encoder already ends at OpenCLIP's penultimate layer: its last hidden state
    (final layer norm included) is MVDream's condition, not the layer before it."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = write_clip_text_encoder(tmp_path / "clip", hidden_size=32, layers=3, heads=2)
    encoder = build_text_encoder({"type": "clip", "path": str(folder)})
    features = encoder.encode(["a red cube", ""])
    assert features.shape == (2, 77, 32) and encoder.dim == 32
    tokens = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))(
        ["a red cube", ""], padding="max_length", max_length=77, return_tensors="pt"
    )
    model = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()
    with torch.no_grad():
        output = model(tokens.input_ids, output_hidden_states=True)
    torch.testing.assert_close(features, output.last_hidden_state)
    torch.testing.assert_close(features, model.final_layer_norm(output.hidden_states[-1]))
    assert not torch.allclose(features, model.final_layer_norm(output.hidden_states[-2]), atol=1e-3)


def test_spec_of_another_version_is_a_user_error(tmp_path: Path) -> None:
    folder = write_clip_text_encoder(tmp_path / "clip", hidden_size=32, layers=1, heads=2)
    with pytest.raises(UserError, match="re-convert the model folder"):
        build_text_encoder({"type": "clip", "path": str(folder), "layer": "penultimate"})


def test_unknown_encoder_type() -> None:
    with pytest.raises(UserError, match="unknown text encoder type 'bert'"):
        build_text_encoder({"type": "bert"})


def test_prompt_processor_uses_the_models_encoder_and_suffix(tiny_model_dir: Path, tmp_path: Path) -> None:
    processor = threestudio_mv.find("mv-prompt-processor")(
        {"prompt": "a red cube", "pretrained_model_name_or_path": str(tiny_model_dir), "cache_dir": str(tmp_path / "cache")}
    )
    out = processor()
    assert out.prompt == "a red cube, 3d asset" and out.negative_prompt == ""
    model = MultiViewDiffusionModel.from_pretrained(tiny_model_dir)
    assert torch.allclose(out.cond, model.text_encoder.encode(["a red cube, 3d asset"]))
    cond, uncond = out.batch(8)
    assert cond.shape == (8, 4, 16) and torch.allclose(uncond[3], model.text_encoder.encode([""])[0])


def test_prompt_processor_empty_prompt_is_a_user_error(tiny_model_dir: Path) -> None:
    cls = threestudio_mv.find("mv-prompt-processor")
    with pytest.raises(UserError, match=r"'system.prompt_processor.prompt' is empty"):
        cls({"prompt": "   ", "pretrained_model_name_or_path": str(tiny_model_dir)}, prefix="system.prompt_processor")


def test_prompt_processor_unknown_key_is_a_user_error() -> None:
    cls = threestudio_mv.find("mv-prompt-processor")
    with pytest.raises(UserError, match="system.prompt_processor.promt"):
        cls({"promt": "a cube"}, prefix="system.prompt_processor")
