"""Plan, write and heal pruned checkpoints.

Writing goes through the merge engine: a pruned model is a ``passthrough``
recipe whose ``slices`` list the kept layer ranges, so it streams tensor by
tensor, renumbers layers, shortens ``num_hidden_layers`` and every per-layer
config list, and fails like a merge (one-line errors, nothing left behind, no
overwrite without ``force``).

A dropped MLP block is written as a layer whose MLP output projection (and its
bias) is scaled by 0: the block then adds nothing to the residual stream, plain
``transformers`` loads the folder unchanged, and splice's own runtime
(:func:`splice.skip.model.load_model`) notices the zero projection and skips
the block's compute.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .model import SkipError, chunks, hidden_stats, layer_costs, load_model, read_calibration, tokenize
from .plan import SkipPlan, get_planner, make_plan


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
    """A skip plan for ``model`` (folder, .safetensors or .gguf) with a registered strategy.

    Give exactly one of ``drop`` (layers, or MLP blocks for ``ffn``), ``ratio``
    (fraction of them) or ``speedup`` (predicted decode speedup). Data-aware
    strategies read ``calibration`` (a text file) or ``calibration_text``.
    """
    from ..checkpoint.reader import open_model

    p = get_planner(strategy)
    given = [x is not None for x in (drop, ratio, speedup)]
    if sum(given) != 1:
        raise SkipError("give exactly one of --drop N, --ratio F or --speedup X")
    if speedup is not None and not speedup >= 1:
        raise SkipError(f"--speedup {speedup}: must be at least 1")
    text = None
    if p.needs_data:
        text = calibration_text if calibration_text is not None else read_calibration(calibration, strategy)
    src = open_model(model)
    try:
        costs = layer_costs(src)
    finally:
        src.close()
    stats = None
    if p.needs_data:
        m = load_model(model, skip_zero_mlps=False)
        ids = tokenize(m, text, calibration_tokens)
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
    heal_steps: int = 0,
    calibration: str | os.PathLike | None = None,
    calibration_text: str | None = None,
    heal_lr: float = 1e-4,
    heal_batch: int = 4,
    seq_len: int = 256,
    calibration_tokens: int = 16384,
    seed: int = 0,
    tune_malloc: bool = False,
) -> dict:
    """Write the pruned model of ``plan`` to ``out`` (optionally healed for ``heal_steps`` steps). Returns a summary.

    ``tune_malloc``: as for ``splice.engine.write_checkpoint`` (the CLI turns it on).
    """
    from ..checkpoint.reader import open_model
    from ..checkpoint.writer import check_output, temp_folder
    from ..engine import run_merge

    check_output(out, force=force, inputs=[plan.model, calibration])
    if plan.num_layers - len(plan.drop_layers) < 1:
        raise SkipError("the plan drops every layer")
    text = None
    if heal_steps:
        if heal_steps < 0:
            raise SkipError(f"--heal {heal_steps}: must be >= 0")
        text = calibration_text if calibration_text is not None else read_calibration(calibration, "--heal")
    src = open_model(plan.model)
    try:
        costs = layer_costs(src)
    finally:
        src.close()
    recipe = recipe_for(plan, costs.mlp_output)
    t0 = time.perf_counter()
    if not heal_steps:
        s = run_merge(recipe, out, force=force, quiet=quiet, tune_malloc=tune_malloc)
        return {"out": s["out"], "layers": s["layers"], "seconds": time.perf_counter() - t0, "healed": None}
    with temp_folder(out) as tmp:
        pruned = tmp / "pruned"
        s = run_merge(recipe, pruned, quiet=quiet, tune_malloc=tune_malloc)
        from .heal import heal

        h = heal(
            pruned,
            text,
            out,
            steps=heal_steps,
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
