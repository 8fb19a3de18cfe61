"""Test-wide settings."""

from __future__ import annotations

import os

import pytest

# Two pytest-xdist workers on two cores: one intra-op thread each (torch and onnxruntime would
# otherwise oversubscribe the cores; measured 30x slower on small tensors under contention).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
