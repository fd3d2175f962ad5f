"""The tiny zoo, built once per test session (and reused across sessions from the repo's .cache/).

Set SPLICE_TEST_ZOO to build it somewhere else. The build is resumable and keyed
by its settings, so a stale or half-built cache is finished or rebuilt, not trusted.
Under pytest-xdist (make test runs two workers) a file lock lets one worker build it
while the other waits, then reuses it.
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tiny_zoo_dir() -> Path:
    env = os.environ.get("SPLICE_TEST_ZOO")
    return Path(env) if env else REPO / ".cache" / "test-zoo" / "tiny"


@pytest.fixture(scope="session")
def tiny_zoo():
    """(zoo folder, manifest) of the tiny tier."""
    from filelock import FileLock

    from splice.zoo import build_zoo

    d = tiny_zoo_dir()
    d.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(d.parent / f".{d.name}.lock")):
        m = build_zoo("tiny", d, seed=0, quiet=True)
    return d, m
