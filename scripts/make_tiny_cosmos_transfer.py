#!/usr/bin/env python
"""Write the tiny random Cosmos-Transfer2.5 teacher that configs/tiny-cosmos-transfer2.5/ name (CPU, seconds).

    .venv/bin/python scripts/make_tiny_cosmos_transfer.py --out runs/tiny-cosmos-transfer2.5/teacher

The folder is a ``Cosmos2_5_TransferPipeline.save_pretrained`` folder (``model_index.json``,
``transformer/``, ``controlnet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``;
the safety checker is listed as null: ``cosmos_guardrail`` is not installed, load the pipeline
with ``safety_checker=PassThroughSafetyChecker()``). The parity tests use the same components.

Sizes follow diffusers' own pipeline test (16 latent channels, width 32, 2 blocks, a 4x8x8
``AutoencoderKLWan``), with a text cross-attention projection from the concatenated hidden
states of a 2-layer Qwen2.5-VL (hidden 16, so 32 channels) as in the real model, and a
byte-level Qwen2 tokenizer built here (no download). Weights are random (fixed seeds); the
ControlNet's output projections are random too, so the control changes every output. The
VAE's posterior is made deterministic (see :func:`tiny_vae`), so the pipeline's sampled
control latents equal the project's posterior mean.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from distill_pl.families.cosmos_transfer.configs import COSMOS_TRANSFER_2_5_SCHEDULER

LATENT_CHANNELS = 16
QWEN_HIDDEN = 16
QWEN_LAYERS = 2
TEXT_DIM = QWEN_HIDDEN * QWEN_LAYERS  # what the pipeline's _get_prompt_embeds concatenates

TRANSFORMER = dict(
    in_channels=LATENT_CHANNELS + 1,
    out_channels=LATENT_CHANNELS,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    mlp_ratio=2,
    text_embed_dim=32,
    adaln_lora_dim=4,
    max_size=(4, 32, 32),
    patch_size=(1, 2, 2),
    rope_scale=(2.0, 1.0, 1.0),
    concat_padding_mask=True,
    extra_pos_embed_type="learnable",
    use_crossattn_projection=True,
    crossattn_proj_in_channels=TEXT_DIM,
    encoder_hidden_states_channels=32,
    controlnet_block_every_n=1,
    img_context_dim_in=32,
    img_context_num_tokens=4,
    img_context_dim_out=32,
)
CONTROLNET = dict(
    n_controlnet_blocks=2,
    in_channels=LATENT_CHANNELS + 1 + 1,
    latent_channels=LATENT_CHANNELS + 1 + 1,
    model_channels=32,
    num_attention_heads=2,
    attention_head_dim=16,
    mlp_ratio=2,
    text_embed_dim=32,
    adaln_lora_dim=4,
    patch_size=(1, 2, 2),
    max_size=(4, 32, 32),
    rope_scale=(2.0, 1.0, 1.0),
    extra_pos_embed_type="learnable",
    img_context_dim_in=32,
    img_context_dim_out=32,
    use_crossattn_projection=True,
    crossattn_proj_in_channels=TEXT_DIM,
    encoder_hidden_states_channels=32,
)
#: the scheduler the diffusers conversion script writes for Cosmos-Transfer2.5
SCHEDULER = COSMOS_TRANSFER_2_5_SCHEDULER
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class PassThroughSafetyChecker(nn.Module):
    """Stands in for ``cosmos_guardrail`` (not installed): accepts every prompt and video."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("device_tracker", torch.zeros(1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.device_tracker.device

    @property
    def dtype(self) -> torch.dtype:
        return self.device_tracker.dtype

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames):
        return frames


def tiny_tokenizer():
    """A byte-level Qwen2 tokenizer: 256 byte tokens + <|endoftext|> (pad), <|im_start|>, <|im_end|>."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_text_encoder(vocab_size: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=QWEN_HIDDEN, intermediate_size=16, num_hidden_layers=QWEN_LAYERS,
            num_attention_heads=2, num_key_value_heads=2, vocab_size=vocab_size,
            rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            rope_theta=1000000.0, bos_token_id=None, eos_token_id=vocab_size - 1,
        ),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=QWEN_HIDDEN,
        vocab_size=vocab_size,
        vision_start_token_id=vocab_size - 1,
        vision_end_token_id=vocab_size - 1,
        vision_token_id=vocab_size - 1,
        image_token_id=vocab_size - 1,
        video_token_id=vocab_size - 1,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_vae(deterministic: bool = True):
    """``AutoencoderKLWan`` 4x8x8, 16 channels, Wan 2.1's latents_mean/std. ``deterministic``:
    the posterior's log-variance is -30 (std 3e-7), so the pipeline's posterior *sample* of
    the control latents equals the project's posterior mean to float32 precision."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    if deterministic:
        with torch.no_grad():
            logvar = slice(LATENT_CHANNELS, 2 * LATENT_CHANNELS)
            vae.quant_conv.weight[logvar] = 0.0
            vae.quant_conv.bias[logvar] = -100.0  # clamped to -30 by the posterior
    return vae.eval()


def tiny_models():
    from diffusers import CosmosControlNetModel, CosmosTransformer3DModel

    torch.manual_seed(0)
    transformer = CosmosTransformer3DModel(**TRANSFORMER)
    torch.manual_seed(1)
    controlnet = CosmosControlNetModel(**CONTROLNET)
    # random (not zero) ControlNet projections: the control branch changes every output
    return transformer.eval(), controlnet.eval()


def tiny_pipeline():
    """A ``Cosmos2_5_TransferPipeline`` of tiny random components (pass-through safety checker)."""
    from diffusers import Cosmos2_5_TransferPipeline, UniPCMultistepScheduler

    from distill_pl.families.cosmos_transfer import padding_resize as cosmos_padding_resize

    cosmos_padding_resize.install()
    transformer, controlnet = tiny_models()
    tokenizer = tiny_tokenizer()
    return Cosmos2_5_TransferPipeline(
        text_encoder=tiny_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        transformer=transformer,
        vae=tiny_vae(),
        scheduler=UniPCMultistepScheduler(**SCHEDULER),
        controlnet=controlnet,
        safety_checker=PassThroughSafetyChecker(),
    )


def save_tiny_pipeline(folder: Path):
    """``tiny_pipeline()`` written with ``save_pretrained`` (safetensors; the safety checker is
    not saved: ``model_index.json`` lists it as null). Returns the pipeline."""
    pipe = tiny_pipeline()
    checker = pipe.safety_checker
    pipe.register_modules(safety_checker=None)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    pipe.register_modules(safety_checker=checker)
    return pipe


def load_pipeline(folder: Path):
    """``Cosmos2_5_TransferPipeline.from_pretrained`` of a local folder (float32), with the
    pass-through safety checker."""
    from diffusers import Cosmos2_5_TransferPipeline

    return Cosmos2_5_TransferPipeline.from_pretrained(
        str(folder), safety_checker=PassThroughSafetyChecker(), local_files_only=True
    )


def write_tiny_cosmos_transfer(out: str | Path) -> Path:
    """Write the tiny pipeline folder to ``out`` and return it."""
    save_tiny_pipeline(Path(out))
    print(f"tiny Cosmos-Transfer2.5 teacher written to {Path(out).resolve()}")
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/tiny-cosmos-transfer2.5/teacher")
    args = parser.parse_args(argv)
    write_tiny_cosmos_transfer(args.out)


if __name__ == "__main__":
    main()
