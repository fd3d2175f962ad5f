"""``splice skip``: faster models by dropping or bypassing layers, and lossless self-speculative decoding.

Python API (the CLI calls exactly these)::

    from splice.skip import plan, prune, generate

    p = plan("model/", "block-influence", drop=8, calibration="text.txt")
    print(p.describe())
    prune(p, "faster/")                                  # plain transformers loads faster/

    g = generate("model/", "Once upon a time", 128, self_speculative="auto", compare=True)
    print(g.text, g.stats.acceptance, g.speedup)

Modules (each name says what it holds; none is rebound by a name below):

* ``strategies`` -- the ``STRATEGIES`` registry, ``SkipPlan`` and ``make_plan`` (torch-free);
* ``costs`` -- the cost model (``LayerCosts``, ``layer_costs``; torch-free);
* ``calibration`` -- calibration text and hidden-state statistics (``hidden_stats``);
* ``pruning`` / ``healing`` -- ``plan`` and ``prune``; ``heal``;
* ``units`` / ``runtime`` -- skip sets as text; bypassing them in a loaded model (``skipping``);
* ``sampling`` / ``autoskip`` / ``decoding`` -- the sampling rule, the ``auto`` skip-set
  policy, the decoding loops and ``generate``.

Names are imported on first use, so ``import splice.skip`` (and ``splice --help``) loads no torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SkipError": "errors",
    "STRATEGIES": "strategies",
    "SkipPlan": "strategies",
    "Strategy": "strategies",
    "make_plan": "strategies",
    "skip_strategy": "strategies",
    "LayerCosts": "costs",
    "layer_costs": "costs",
    "HiddenStats": "calibration",
    "hidden_stats": "calibration",
    "stats_from_states": "calibration",
    "plan": "pruning",
    "prune": "pruning",
    "recipe_for": "pruning",
    "heal": "healing",
    "parse_units": "units",
    "format_units": "units",
    "skipping": "runtime",
    "bypass_zero_mlps": "runtime",
    "warp": "sampling",
    "accept_drafts": "sampling",
    "AutoSkip": "autoskip",
    "AutoSkipConfig": "autoskip",
    "GenerationResult": "decoding",
    "GenerationStats": "decoding",
    "Generation": "decoding",
    "SelfSpeculativeDecoder": "decoding",
    "generate": "decoding",
    "generate_plain": "decoding",
    "read_prompt": "decoding",
    "self_speculative_generate": "decoding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
