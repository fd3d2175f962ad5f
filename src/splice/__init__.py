"""splice: compose new language models out of existing checkpoints.

The Python API mirrors the CLI:

    splice.merge("recipe.yaml", "merged/", seed=7)
    splice.merge_state_dicts("ties", [sd_a, sd_b], base=sd_base, parameters=[{"weight": 1, "density": 0.5}] * 2)
    splice.merge_tensors("slerp", [b], a, t=0.5)
    splice.calibrate("models/code", "code.jsonl", "code.stats.safetensors", tokens=16384)  # for regmean

Heavy imports (torch, transformers) happen on first use, so ``splice --help`` is fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["calibrate", "merge", "merge_state_dicts", "merge_tensors", "plan", "__version__"]


def merge(recipe: Any, out: Any, **options: Any) -> dict:
    """Run a merge recipe (path, YAML text, dict or Recipe) into folder ``out``.

    Options: force, seed, device, shard_size, allow_pickle, quiet, workers, threads;
    for a multi-stage recipe (several YAML documents) also stage and intermediate_dir
    (see ``splice.multi.run_stages``).
    Returns a summary: out, bytes, tensors, seconds, layers, method (and stages).
    """
    from .multi import is_multi_stage, run_stages

    if is_multi_stage(recipe) or "stage" in options or "intermediate_dir" in options:
        return run_stages(recipe, out, **options)
    from .engine import run_merge

    return run_merge(recipe, out, **options)


def calibrate(model: Any, text: Any, out: Any = None, **options: Any) -> dict:
    """Measure ``model`` on calibration ``text`` into the statistics file ``out`` (see ``splice.calibration.calibrate``).

    Without ``out`` the file goes to the statistics cache, and the same model, text and settings
    measured before are reused. Options: tokens, seed, seq_len, batch_size, fisher, force, quiet, cache.
    Returns a summary: out, tokens, windows, grams, embeddings, seconds, cached.
    """
    from .calibration import calibrate as f

    return f(model, text, out, **options)


def plan(recipe: Any, **options: Any):
    """Plan a recipe without running it (reads only headers and configs)."""
    from .engine import plan_recipe

    return plan_recipe(recipe, **options)[0]


def merge_state_dicts(*args: Any, **kwargs: Any):
    from .engine import merge_state_dicts as f

    return f(*args, **kwargs)


def merge_tensors(*args: Any, **kwargs: Any):
    from .engine import merge_tensors as f

    return f(*args, **kwargs)
