"""Fixtures for the MoE tests (helpers live in moe_helpers.py, a name no other test folder uses)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_model
from moe_helpers import make_expert


@pytest.fixture(scope="session")
def moe_donors(tmp_path_factory):
    """A 2-layer Llama base and three MLP-only fine-tunes of it."""
    root = tmp_path_factory.mktemp("moe_llama")
    base = make_model(root / "base", "llama", seed=0, layers=2, hidden=64)
    experts = [make_expert(base, root / f"e{i}", seed=100 + i, scale=0.5) for i in range(3)]
    return base, experts


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids thread contention on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
