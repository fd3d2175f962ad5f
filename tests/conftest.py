import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_model  # noqa: E402


@pytest.fixture(scope="session")
def llama_trio(tmp_path_factory):
    """A tiny Llama base and three fine-tunes of it."""
    root = tmp_path_factory.mktemp("llama")
    base = make_model(root / "base", "llama", seed=0)
    fts = [make_model(root / f"ft{i}", "llama", seed=10 + i, from_model=base) for i in range(3)]
    return base, fts
