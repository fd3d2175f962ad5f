"""Plan, write and heal pruned checkpoints.

Writing goes through the merge engine: a pruned model is a ``passthrough``
recipe whose ``slices`` list the kept layer ranges, so it streams tensor by
tensor, renumbers layers, shortens ``num_hidden_layers`` and every per-layer
config list, and fails like a merge (one-line errors, nothing left behind, no
overwrite without ``force``).

A dropped MLP block is written as a layer whose MLP output projection (and its
bias) is scaled by 0: the block then adds nothing to the residual stream, plain
``transformers`` loads the folder unchanged, and splice's own loader
(``splice.hf.load_causal_lm(..., bypass_zero_mlps=True)``) notices the zero
projection and skips the block's compute.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ..errors import option
from .calibration import chunks, hidden_stats, read_calibration, tokenize
from .costs import layer_costs
from .errors import SkipError, check_float, check_int
from .strategies import STRATEGIES, SkipPlan, check_count, make_plan


def plan(
    model: str | os.PathLike,
    strategy: str = "balanced",
    *,
    drop: int | None = None,
    ratio: float | None = None,
    speedup: float | None = None,
    calibration: str | os.PathLike | None = None,
    calibration_text: str | None = None,
    calibration_tokens: int = 4096,
    seq_len: int = 256,
    quiet: bool = True,
) -> SkipPlan:
    """A skip plan for ``model`` with a registered strategy.

    Args:
        model: a model folder, ``.safetensors`` or ``.gguf`` file, or cached id.
        strategy: a name in ``STRATEGIES`` (``balanced``, ``block-influence``, ``angular``, ``ffn``).
        drop, ratio, speedup: exactly one: layers (MLP blocks for ``ffn``) to drop, a fraction of
            them, or a predicted decode speedup.
        calibration: a text file for data-aware strategies (or give ``calibration_text``).
        calibration_tokens: tokens of calibration text to use (>= 1).
        seq_len: calibration sequence length (>= 2).
        quiet: no progress output.

    Returns:
        The :class:`SkipPlan`.
    """
    from ..checkpoint.reader import open_model

    chosen = STRATEGIES.get(strategy)
    check_count(drop, ratio, speedup)
    check_int("calibration_tokens", calibration_tokens, 1)
    check_int("seq_len", seq_len, 2)
    text = None
    if chosen.needs_data:
        text = calibration_text if calibration_text is not None else read_calibration(calibration, f"strategy {strategy!r}")
    src = open_model(model)
    try:
        costs = layer_costs(src)
    finally:
        src.close()
    stats = None
    if chosen.needs_data:
        from ..hf import load_causal_lm

        m, tok = load_causal_lm(model, with_tokenizer=True)
        ids = tokenize(tok, text, calibration_tokens)
        seqs = chunks(ids, seq_len)
        prog = None if quiet else _progress("calibrating")
        stats = hidden_stats(m, seqs, progress=prog)
        if prog:
            print(file=sys.stderr)
        del m
    return make_plan(costs, strategy, stats, model=str(model), drop=drop, ratio=ratio, speedup=speedup)


def _progress(what: str):
    def f(k, n):
        print(f"\r{what}: {k}/{n} sequences", end="", file=sys.stderr, flush=True)

    return f


def recipe_for(plan: SkipPlan, mlp_outputs: dict[int, list[str]] | None = None) -> dict:
    """The ``passthrough`` recipe that writes ``plan``'s pruned model."""
    ref = plan.model
    slices = []
    drop_mlp = set(plan.drop_mlp)
    kept = plan.kept_layers
    k = 0
    while k < len(kept):
        start = kept[k]
        if start in drop_mlp:
            outs = (mlp_outputs or {}).get(start)
            if not outs:
                raise SkipError(f"model {ref}: cannot find the MLP output projection of layer {start}")
            filters = sorted({n.split(f".{start}.", 1)[1].rsplit(".", 1)[0] for n in outs})
            slices.append(
                {
                    "sources": [{"model": ref, "layer_range": [start, start + 1]}],
                    "parameters": {"scale": [{"filter": f"{f}.", "value": 0.0} for f in filters]},
                }
            )
            k += 1
            continue
        end = start
        while k + 1 < len(kept) and kept[k + 1] == end + 1 and kept[k + 1] not in drop_mlp:
            k += 1
            end = kept[k]
        slices.append({"sources": [{"model": ref, "layer_range": [start, end + 1]}]})
        k += 1
    what = []
    if plan.drop_layers:
        what.append(f"layers {plan.drop_layers} dropped")
    if plan.drop_mlp:
        what.append(f"MLP blocks of layers {plan.drop_mlp} zeroed")
    return {
        "merge_method": "passthrough",
        "slices": slices,
        "name": f"{Path(str(ref)).name} pruned by splice skip ({plan.strategy}: {', '.join(what) or 'nothing dropped'})",
    }


def prune(
    plan: SkipPlan,
    out: str | os.PathLike,
    *,
    force: bool = False,
    quiet: bool = True,
    heal: int = 0,
    calibration: str | os.PathLike | None = None,
    calibration_text: str | None = None,
    heal_lr: float = 1e-4,
    heal_batch: int = 4,
    seq_len: int = 256,
    calibration_tokens: int = 16384,
    seed: int = 0,
    tune_malloc: bool = False,
) -> dict:
    """Write the pruned model of ``plan`` to ``out``, optionally healed.

    Args:
        plan: a :class:`SkipPlan` (from ``plan``).
        out: the output folder (refused if it exists and is not empty, unless ``force``).
        heal: fine-tune the layers next to the cuts for this many steps (0: no healing) on
            ``calibration`` (a text file) or ``calibration_text``.
        heal_lr, heal_batch: healing's learning rate (> 0) and sequences per step (>= 1).
        seq_len: healing sequence length (>= 2); calibration_tokens: tokens of text to heal on (>= 1).
        seed: seeds healing.
        tune_malloc: as for ``splice.engine.write_checkpoint`` (the CLI turns it on).

    Returns:
        A summary: ``out``, ``layers``, ``seconds`` and ``healed`` (None, or healing's summary).
    """
    from ..checkpoint.reader import open_model
    from ..checkpoint.writer import check_output, temp_folder
    from ..engine import run_merge

    check_int("heal", heal, 0)
    check_float("heal_lr", heal_lr, 0.0, low_open=True)
    check_int("heal_batch", heal_batch, 1)
    check_int("seq_len", seq_len, 2)
    check_int("calibration_tokens", calibration_tokens, 1)
    check_output(out, force=force, inputs=[plan.model, calibration])
    if plan.num_layers - len(plan.drop_layers) < 1:
        raise SkipError("the plan drops every layer")
    text = None
    if heal:
        text = calibration_text if calibration_text is not None else read_calibration(calibration, option("heal", heal))
    src = open_model(plan.model)
    try:
        costs = layer_costs(src)
    finally:
        src.close()
    recipe = recipe_for(plan, costs.mlp_output)
    t0 = time.perf_counter()
    if not heal:
        s = run_merge(recipe, out, force=force, quiet=quiet, tune_malloc=tune_malloc)
        return {"out": s["out"], "layers": s["layers"], "seconds": time.perf_counter() - t0, "healed": None}
    with temp_folder(out) as tmp:
        pruned = tmp / "pruned"
        s = run_merge(recipe, pruned, quiet=quiet, tune_malloc=tune_malloc)
        from .healing import heal as heal_pruned

        h = heal_pruned(
            pruned,
            text,
            out,
            steps=heal,
            lr=heal_lr,
            batch=heal_batch,
            seq_len=seq_len,
            max_tokens=calibration_tokens,
            seed=seed,
            force=force,
            quiet=quiet,
            plan=plan,
            tune_malloc=tune_malloc,
        )
    return {"out": str(Path(out).resolve()), "layers": s["layers"], "seconds": time.perf_counter() - t0, "healed": h}
