"""The tiny random Cosmos-Transfer2.5 components of scripts/make_tiny_cosmos_transfer.py, for the tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from tests.cli_helpers import REPO

_spec = importlib.util.spec_from_file_location(
    "make_tiny_cosmos_transfer", REPO / "scripts/make_tiny_cosmos_transfer.py"
)
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

LATENT_CHANNELS = script.LATENT_CHANNELS
QWEN_HIDDEN = script.QWEN_HIDDEN
TEXT_DIM = script.TEXT_DIM
PassThroughSafetyChecker = script.PassThroughSafetyChecker
save_tiny_pipeline = script.save_tiny_pipeline
load_pipeline = script.load_pipeline
write_tiny_cosmos_transfer = script.write_tiny_cosmos_transfer

#: Cosmos-Predict2.5's transformer at the tiny size: Transfer's base without the ControlNet
#: injection points and without image context (the Predict pipeline passes none)
PREDICT_TRANSFORMER = {k: v for k, v in script.TRANSFORMER.items()
                       if k != "controlnet_block_every_n" and not k.startswith("img_context")}


def tiny_predict_pipeline():
    """A ``Cosmos2_5_PredictBasePipeline`` of tiny random components (the Transfer pipeline's
    text encoder, tokenizer, VAE and scheduler; pass-through safety checker)."""
    from diffusers import Cosmos2_5_PredictBasePipeline, CosmosTransformer3DModel, UniPCMultistepScheduler

    torch.manual_seed(2)
    transformer = CosmosTransformer3DModel(**PREDICT_TRANSFORMER).eval()
    tokenizer = script.tiny_tokenizer()
    return Cosmos2_5_PredictBasePipeline(
        text_encoder=script.tiny_text_encoder(len(tokenizer)), tokenizer=tokenizer, transformer=transformer,
        vae=script.tiny_vae(), scheduler=UniPCMultistepScheduler(**script.SCHEDULER),
        safety_checker=PassThroughSafetyChecker(),
    )


def save_tiny_predict_pipeline(folder: Path):
    """``tiny_predict_pipeline()`` written with ``save_pretrained`` (the safety checker as
    null). Returns the pipeline."""
    pipe = tiny_predict_pipeline()
    checker = pipe.safety_checker
    pipe.register_modules(safety_checker=None)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    pipe.register_modules(safety_checker=checker)
    return pipe


def load_predict_pipeline(folder: Path):
    """``Cosmos2_5_PredictBasePipeline.from_pretrained`` of a local folder (float32), with the
    pass-through safety checker."""
    from diffusers import Cosmos2_5_PredictBasePipeline

    return Cosmos2_5_PredictBasePipeline.from_pretrained(
        str(folder), safety_checker=PassThroughSafetyChecker(), local_files_only=True
    )
