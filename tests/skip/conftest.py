import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

from helpers import make_model  # noqa: E402
from zoo_fixture import tiny_zoo  # noqa: E402, F401  (the tiny zoo's base: a trained model to decode with)


@pytest.fixture(scope="session")
def skip_models(tmp_path_factory):
    """Tiny random models (6 layers) and a calibration file of their word-level tokens."""
    root = tmp_path_factory.mktemp("skip")
    models = {
        "llama": make_model(root / "llama", "llama", seed=3, layers=6),
        "qwen2": make_model(root / "qwen2", "qwen2", seed=4, layers=6),
        "llama64": make_model(root / "llama64", "llama", seed=5, layers=6, dtype=torch.float64),
    }
    cal = root / "cal.txt"
    g = torch.Generator().manual_seed(0)
    cal.write_text(" ".join(f"t{int(i)}" for i in torch.randint(3, 96, (1500,), generator=g)))
    return models, cal


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded machine thread barriers cost seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
