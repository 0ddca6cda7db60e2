"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def cosmos_pipeline_folder(tmp_path_factory):
    """A tiny random Cosmos2_5_TransferPipeline saved with its own ``save_pretrained``
    (built once per test session: read it, never write into it)."""
    from tests.models.families import cosmos_tiny

    folder = tmp_path_factory.mktemp("cosmos") / "pipeline"
    cosmos_tiny.save_tiny_pipeline(folder)
    return folder
