"""``splice moe`` and ``splice moe-compress``: sparse mixtures of experts from dense experts, and back down.

from splice.moe import build_moe, compress_moe
build_moe("moe.yaml", "moe/", calibrate=200)
compress_moe("moe/", "smaller/", experts=2, calibration=["text.txt"])
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_moe", "compress_moe", "load_moe_recipe", "GATE_INITIALISERS"]


def build_moe(recipe: Any, out: Any, **options: Any) -> dict:
    from .build import build_moe as f

    return f(recipe, out, **options)


def compress_moe(moe: Any, out: Any, **options: Any) -> dict:
    from .compress import compress_moe as f

    return f(moe, out, **options)


def load_moe_recipe(src: Any):
    from .recipe import load_moe_recipe as f

    return f(src)


def __getattr__(name: str):
    if name == "GATE_INITIALISERS":
        from .gates import GATE_INITIALISERS

        return GATE_INITIALISERS
    raise AttributeError(name)
