import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# No test reads or writes the user's home caches (~/.cache/splice, ~/.cache/huggingface):
# every cache splice or Hugging Face would use points into one folder made for this run,
# set before anything imports huggingface_hub (which reads these once, at import).
_CACHE_HOME = tempfile.mkdtemp(prefix="splice-test-cache-")
atexit.register(shutil.rmtree, _CACHE_HOME, ignore_errors=True)
for _var, _sub in {"XDG_CACHE_HOME": "", "SPLICE_CACHE": "splice", "HF_HOME": "huggingface"}.items():
    os.environ[_var] = os.path.join(_CACHE_HOME, _sub)
os.environ.pop("HF_HUB_CACHE", None)  # derived from HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"  # and nothing is fetched from a hub

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_model  # noqa: E402
from mergekit_side import mergekit  # noqa: E402, F401  (mergekit 0.1.5 in its side venv, for parity tests)
from zoo_fixture import tiny_zoo  # noqa: E402, F401  (the session's tiny zoo, for every test folder)


@pytest.fixture(scope="session")
def llama_trio(tmp_path_factory):
    """A tiny Llama base and three fine-tunes of it."""
    root = tmp_path_factory.mktemp("llama")
    base = make_model(root / "base", "llama", seed=0)
    fts = [make_model(root / f"ft{i}", "llama", seed=10 + i, from_model=base) for i in range(3)]
    return base, fts


# make test runs two xdist workers, whole files per worker, handed out in collection order
# (--no-loadscope-reorder). The demo file goes first: it builds the session zoo and then runs the
# longest test, the longest chain of the suite. Files that do not need the zoo come next, those that
# do last, so the other worker rarely waits on the zoo's build lock.
FIRST = ("tests/zoo/test_zoo_demo.py",)


def pytest_collection_modifyitems(config, items):
    def file_of(item):
        return item.nodeid.split("::")[0]

    needs_zoo = {file_of(i) for i in items if "tiny_zoo" in getattr(i, "fixturenames", ())}

    def rank(item):
        f = file_of(item)
        return 0 if f in FIRST else (2 if f in needs_zoo else 1)

    items.sort(key=rank)
