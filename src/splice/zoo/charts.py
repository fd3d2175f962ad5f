"""What every demo chart shares: matplotlib without a screen (or None when it is absent), and an atomic PNG write."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None without matplotlib (the charts are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_png(fig, path: Path) -> str:
    """Write ``fig`` to ``path`` whole (temporary file, then rename), close it, and return the path."""
    import matplotlib.pyplot as plt

    from ..eval.results import write_atomic

    fig.tight_layout()
    try:
        write_atomic(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return str(path)
