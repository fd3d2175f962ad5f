"""The README stays true: its methods table is what the registry says."""

import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_methods_table_matches_registry():
    out = subprocess.run([sys.executable, "-m", "splice", "methods", "--markdown"], capture_output=True, text=True, check=True).stdout
    assert out.strip() in README.read_text(), "README methods table is stale: regenerate with `splice methods --markdown`"


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
