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
