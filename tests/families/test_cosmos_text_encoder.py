"""CosmosTextEncoder against Cosmos2_5_TransferPipeline.encode_prompt (tiny random Qwen2.5-VL)."""

from __future__ import annotations

import pytest
import torch

from distill_pl.families.cosmos_transfer.text_encoder import CosmosTextEncoder, cosmos_text_encoder_dim
from tests.families import cosmos_tiny

PROMPTS = ["a robot arm lifts a blue cloth", "dance monkey"]


@pytest.fixture(scope="module")
def pipeline_and_folder(cosmos_pipeline_folder, one_thread):
    """The tiny pipeline, and its text encoder folder (the tokenizer is the sibling tokenizer/)."""
    return cosmos_tiny.load_pipeline(cosmos_pipeline_folder), cosmos_pipeline_folder / "text_encoder"


def test_encode_equals_pipeline(pipeline_and_folder):
    pipe, folder = pipeline_and_folder
    encoder = CosmosTextEncoder(str(folder), max_length=160)
    embeds, mask = encoder.encode(PROMPTS)
    expected, _ = pipe.encode_prompt(
        PROMPTS, do_classifier_free_guidance=False, max_sequence_length=160, device=torch.device("cpu")
    )
    assert encoder.dim == cosmos_text_encoder_dim(str(folder)) == cosmos_tiny.TEXT_DIM == expected.shape[-1]
    assert embeds.shape == expected.shape == (2, 160, cosmos_tiny.TEXT_DIM)
    assert embeds.dtype == torch.float32
    torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-6)
    # every layer's slice is normalised, padding positions included
    layer = embeds[..., : cosmos_tiny.QWEN_HIDDEN]
    torch.testing.assert_close(layer.mean(-1), torch.zeros(2, 160), rtol=0, atol=1e-5)
    # the mask marks the chat's tokens (one byte-level token per character here): the longer
    # prompt has more, the tail is padding
    real = mask.sum(1)
    assert real[0] > real[1] and mask[:, 0].all() and not mask[:, -1].any()
    ids, _ = encoder.tokenize(PROMPTS)
    assert (ids[~mask] == pipe.tokenizer.pad_token_id).all()


def test_truncates_to_max_length(pipeline_and_folder):
    pipe, folder = pipeline_and_folder
    encoder = CosmosTextEncoder(str(folder), max_length=20)
    embeds, mask = encoder.encode(["a long prompt " * 10])
    expected, _ = pipe.encode_prompt(
        ["a long prompt " * 10], do_classifier_free_guidance=False, max_sequence_length=20,
        device=torch.device("cpu"),
    )
    assert embeds.shape == (1, 20, cosmos_tiny.TEXT_DIM) and mask.all()
    torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-6)


def test_other_model_type_is_an_error(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"{tmp_path}: model_type 'bert', Cosmos 2.5 embeddings need a 'qwen2_5_vl'"):
        CosmosTextEncoder(str(tmp_path))
