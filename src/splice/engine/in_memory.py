"""Merge tensors and whole state dicts in memory with the registered methods (no files)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import RecipeError
from ..methods import get_method
from .run import tensor_seed


def merge_tensors(
    method: str, tensors: list[torch.Tensor], base: torch.Tensor | None = None, *, seed: int | None = None, name: str = "", **params: Any
) -> torch.Tensor:
    """Merge one parameter's tensors with a registered method (parameters as in recipes).

    Per-model parameters may be given as scalars (applied to every model) or lists. A
    data-aware method (``regmean``) also takes ``statistics=``: per model, this tensor's
    calibration statistics (``splice.calibration.Statistics.load``), or None.
    """
    m = get_method(method)
    kw: dict[str, Any] = {}
    if m.statistics and "statistics" in params:
        params = dict(params)
        kw["statistics"] = params.pop("statistics")
    given = {k.rstrip("_"): v for k, v in params.items()}
    for p in m.params:
        if p.name in given:
            v = given.pop(p.name)
        elif p.required:
            raise RecipeError(f"merge method {method!r} needs parameter {p.name!r}")
        else:
            v = p.default
        if p.per_model and not isinstance(v, (list, tuple)):
            v = [v] * len(tensors)
        kw[p.py_name] = list(v) if p.per_model else v
    if given:
        raise RecipeError(f"unknown parameter(s) {sorted(given)} for merge method {method!r} (valid: {', '.join(m.param_names)})")
    if m.base == "required" and base is None:
        raise RecipeError(f"merge method {method!r} needs a base tensor")
    if m.randomized:
        g = torch.Generator(device=tensors[0].device)
        g.manual_seed(tensor_seed(seed or 0, name))
        kw["generator"] = g
    dt = tensors[0].dtype
    cdt = torch.float64 if dt == torch.float64 else torch.float32
    out = m([t.to(cdt) for t in tensors], base.to(cdt) if base is not None else None, **kw)
    return out.to(dt)


def merge_state_dicts(
    method: str,
    state_dicts: list[dict[str, torch.Tensor]],
    base: dict[str, torch.Tensor] | None = None,
    *,
    parameters: list[dict] | dict | None = None,
    seed: int | None = None,
    **global_params: Any,
) -> dict[str, torch.Tensor]:
    """Merge whole in-memory state dicts tensor by tensor.

    ``parameters``: per-model dicts (one per state dict), e.g. ``[{"weight": 0.5}, ...]``;
    ``global_params``: method-wide parameters such as ``normalize=True``.
    """
    m = get_method(method)
    per = parameters if isinstance(parameters, list) else [dict(parameters or {})] * len(state_dicts)
    if len(per) != len(state_dicts):
        raise RecipeError("parameters: give one dict per state dict")
    out: dict[str, torch.Tensor] = {}
    for name in state_dicts[0]:
        params = dict(global_params)
        for p in m.params:
            if p.per_model and any(p.name in d for d in per):
                params[p.name] = [d.get(p.name, p.default) for d in per]
        tensors = [sd[name] for sd in state_dicts]
        if not tensors[0].is_floating_point():
            out[name] = tensors[0].clone()
            continue
        out[name] = merge_tensors(method, tensors, base[name] if base is not None else None, seed=seed, name=name, **params)
    return out
