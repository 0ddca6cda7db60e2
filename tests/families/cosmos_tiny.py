"""The tiny random Cosmos-Transfer2.5 components of scripts/make_tiny_cosmos_transfer.py, for the tests."""

from __future__ import annotations

import importlib.util

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
