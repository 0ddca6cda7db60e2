"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run much faster on one torch thread on a shared 2-core CPU (two threads
    oversubscribe it), and the same thread count in every process keeps the kernels, hence
    the bits, identical across the processes a test compares."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cosmos_pipeline_folder(tmp_path_factory):
    """A tiny random Cosmos2_5_TransferPipeline saved with its own ``save_pretrained``
    (built once per test session: read it, never write into it)."""
    from tests.families import cosmos_tiny

    folder = tmp_path_factory.mktemp("cosmos") / "pipeline"
    cosmos_tiny.save_tiny_pipeline(folder)
    return folder
