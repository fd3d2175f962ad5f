"""Skip sets as text and as sets of units. Torch-free.

A unit is ``(layer, kind)`` with kind ``"layer"`` (the whole decoder layer),
``"attn"`` or ``"mlp"``; written as ``"4-9,12,mlp20-22,attn15"`` (plain numbers
are whole layers).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import SkipError

Unit = tuple[int, str]
KINDS = ("layer", "attn", "mlp")


def parse_units(spec: str, num_layers: int) -> set[Unit]:
    """``"4-9,12,mlp20-22,attn15"`` -> units, checked against a model of ``num_layers`` layers."""
    units: set[Unit] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(layer|attn|mlp)?(\d+)(?:-(\d+))?", part)
        if not m:
            raise SkipError(f"skip set {spec!r}: cannot read {part!r} (examples: 4-9, 12, mlp20-22, attn15)")
        kind = m.group(1) or "layer"
        a = int(m.group(2))
        b = int(m.group(3)) if m.group(3) else a
        if b < a:
            raise SkipError(f"skip set {spec!r}: range {part!r} goes backwards")
        if b >= num_layers:
            raise SkipError(f"skip set {spec!r}: layer {b} does not exist (the model has {num_layers} layers, 0-{num_layers - 1})")
        units |= {(i, kind) for i in range(a, b + 1)}
    return normalize(units)


def normalize(units: Iterable[Unit]) -> set[Unit]:
    """Fold attn+mlp of one layer into the layer, and drop sub-blocks of skipped layers."""
    units = set(units)
    for i in {i for i, k in units}:
        if (i, "attn") in units and (i, "mlp") in units:
            units -= {(i, "attn"), (i, "mlp")}
            units.add((i, "layer"))
        if (i, "layer") in units:
            units -= {(i, "attn"), (i, "mlp")}
    return units


def ranges(ix: Iterable[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3,7"``."""
    ix = sorted(ix)
    out, start = [], None
    for k, i in enumerate(ix):
        if start is None:
            start = i
        if k + 1 == len(ix) or ix[k + 1] != i + 1:
            out.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)


def format_units(units: Iterable[Unit]) -> str:
    """Units -> the skip-set text ``parse_units`` reads (``"none"`` for an empty set)."""
    units = set(units)
    parts = []
    for kind in KINDS:
        ix = sorted(i for i, k in units if k == kind)
        if ix:
            r = ranges(ix)
            parts.append(r if kind == "layer" else ",".join(kind + x for x in r.split(",")))
    return ",".join(parts) or "none"
