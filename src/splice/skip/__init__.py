"""``splice skip``: faster models by dropping or bypassing layers, and lossless self-speculative decoding.

Python API (the CLI calls exactly these)::

    from splice.skip import plan, prune, load_model, SelfSpeculativeDecoder, generate_plain

    p = plan("model/", "block-influence", drop=8, calibration="text.txt")
    print(p.describe())
    prune(p, "faster/")                                  # plain transformers loads faster/

    m = load_model("model/")
    ids = ...                                            # prompt token ids
    r = SelfSpeculativeDecoder(m, "auto").generate(ids, 128)
    print(r.stats.acceptance, r.stats.tokens_per_second)
"""

from .heal import heal
from .model import HiddenStats, LayerCosts, SkipError, hidden_stats, layer_costs, load_model, stats_from_states
from .plan import STRATEGIES, SkipPlan, get_planner, make_plan, planner
from .prune import plan, prune, recipe_for
from .runtime import bypass_zero_mlps, format_units, parse_units, skipping
from .speculative import (
    AutoSkip,
    GenerationResult,
    GenerationStats,
    SelfSpeculativeDecoder,
    accept_drafts,
    generate_plain,
    self_speculative_generate,
    warp,
)

__all__ = [
    "STRATEGIES",
    "AutoSkip",
    "GenerationResult",
    "GenerationStats",
    "HiddenStats",
    "LayerCosts",
    "SelfSpeculativeDecoder",
    "SkipError",
    "SkipPlan",
    "accept_drafts",
    "bypass_zero_mlps",
    "format_units",
    "generate_plain",
    "get_planner",
    "heal",
    "hidden_stats",
    "layer_costs",
    "load_model",
    "make_plan",
    "parse_units",
    "plan",
    "planner",
    "prune",
    "recipe_for",
    "self_speculative_generate",
    "skipping",
    "stats_from_states",
    "warp",
]
