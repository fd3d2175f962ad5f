"""The demo's ``skip`` part: drop layers of the base for speed, and show what it costs.

For one or two drop counts (from the model's depth, ``drop_counts``), a
``block-influence`` plan (ShortGPT: drop the layers that change the hidden state
least on calibration text, here the zoo's training text) from
``splice.skip.make_plan``, written with ``splice.skip.prune``; its held-out loss
per domain with the same evaluation as the merges, and its decode speed against
the full model: ``splice.skip.generate_plain`` (greedy, KV cache) for a few new
tokens, the two models measured in alternation so load changes hit both alike,
the median of a few pairs. Writes ``skip.json`` and ``skip.png``; plans, pruned
models and speeds are cached in ``out/skip/``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from .demo import DemoRun, _folder_stamp, _hash, read_stamp, write_stamp

SKIP_STRATEGY = "block-influence"  # data-aware, the best quality per dropped layer in benchmarks/skip_bench.py on smol
SKIP_DROP_SHARES = (0.125, 0.25)  # layers dropped, as shares of the depth (rounded, at least 1, distinct)
SKIP_CALIBRATION_CHARS = 4000  # training-text characters per domain the planner measures layers on
SKIP_CALIBRATION_TOKENS = 4096
SKIP_DECODE_TOKENS = 32  # new tokens per timed generation: seconds on the tiny model, not minutes on smol
SKIP_DECODE_REPEATS = 5  # alternating (full, pruned) pairs; the median is reported
SKIP_PROMPT_TOKENS = 32


def drop_counts(num_layers: int) -> list[int]:
    """Layers to drop: each share in ``SKIP_DROP_SHARES`` of the depth, rounded, at least 1, leaving at least 1."""
    return sorted({max(1, round(num_layers * s)) for s in SKIP_DROP_SHARES if max(1, round(num_layers * s)) < num_layers})


def calibration_text(run: DemoRun, chars: int = SKIP_CALIBRATION_CHARS) -> str:
    """The start of every domain's training text (never its held-out text)."""
    from .build import read_jsonl

    parts = []
    for d, v in run.manifest["domains"].items():
        buf, got = [], 0
        for row in read_jsonl(run.zoo_dir / v["train_file"]):
            buf.append(row["text"])
            got += len(row["text"])
            if got >= chars:
                break
        parts.append("\n\n".join(buf)[:chars])
    return "\n\n".join(parts)


def decode_speeds(models: dict[str, object], prompt_ids: list[int], new_tokens: int, repeats: int) -> dict[str, list[float]]:
    """Decode tokens/s of each model (prompt pass excluded), measured in turn, ``repeats`` rounds, after a warm-up."""
    from ..skip import generate_plain

    for m in models.values():
        generate_plain(m, prompt_ids, 4)
    rates: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(repeats):
        for n, m in models.items():
            rates[n].append(generate_plain(m, prompt_ids, new_tokens).stats.decode_tokens_per_second)
    return rates


def run_skip_part(run: DemoRun, *, chart: bool = True) -> dict:
    """Plan, prune, evaluate and time the layer-skipped base; write ``skip.json`` (+ ``skip.png``); return the report."""
    from ..checkpoint import open_model
    from ..eval.results import write_text_atomic
    from ..skip import layer_costs

    src = open_model(run.base)
    try:
        costs = layer_costs(src)
    finally:
        src.close()
    counts = drop_counts(costs.num_layers)
    cal = {"strategy": SKIP_STRATEGY, "chars": SKIP_CALIBRATION_CHARS, "tokens": SKIP_CALIBRATION_TOKENS}
    stamps: dict[int, dict] = {}
    folders = {n: run.out / "skip" / f"drop-{n}" for n in counts}
    keys = {n: _hash([cal, n, run.manifest["models"]["base"].get("key")]) for n in counts}
    for n in counts:
        info = read_stamp(folders[n])
        if info.get("key") == keys[n]:
            stamps[n] = info
    todo = [n for n in counts if n not in stamps]
    if todo:
        stamps.update(_plan_and_prune(run, costs, todo, folders, keys))

    base_r = run.results["base"]
    plans = []
    for n in counts:
        r = run.evaluate(f"skip:drop-{n}", str(folders[n]), "skip")
        lb = {d: v["loss"] for d, v in base_r["domains"].items()}
        lp = {d: v["loss"] for d, v in r["domains"].items()}
        pct = {d: round(100 * (lp[d] - lb[d]) / lb[d], 3) for d in lb}
        plans.append(
            {
                "drop": n,
                "drop_layers": stamps[n]["plan"]["drop_layers"],
                "kept_layers": stamps[n]["plan"]["kept_layers"],
                "path": str(folders[n]),
                "params_after": stamps[n]["plan"]["params_after"],
                "predicted_speedup": round(stamps[n]["plan"]["predicted_speedup"], 3),
                "planner_scores": stamps[n]["plan"]["scores"],
                "loss": lp,
                "loss_delta": {d: round(lp[d] - lb[d], 5) for d in lb},
                "loss_delta_pct": pct,
                "mean_loss_delta_pct": round(sum(pct.values()) / len(pct), 3),
                "tasks": {t: v["acc"] for t, v in r["tasks"].items()},
            }
        )
    speeds = _speeds(run, folders, stamps)
    for p in plans:
        p["decode"] = speeds[p["drop"]]
    report = {
        "strategy": SKIP_STRATEGY,
        "model": run.base,
        "num_layers": costs.num_layers,
        "params": costs.total_params,
        "drop_counts": counts,
        "decode_tokens": SKIP_DECODE_TOKENS,
        "decode_repeats": SKIP_DECODE_REPEATS,
        "decode_runtime": "splice.skip.generate_plain (greedy, KV cache)",
        "torch_threads": _threads(),
        "base": {"loss": {d: v["loss"] for d, v in base_r["domains"].items()}, "tasks": {t: v["acc"] for t, v in base_r["tasks"].items()}},
        "plans": plans,
        "eval": run.ev,
    }
    write_text_atomic(run.out / "skip.json", json.dumps(report, indent=2) + "\n")
    if chart and plans:
        report["chart"] = write_skip_chart(report, run.out / "skip.png", run.zoo)
    return report


def _plan_and_prune(run: DemoRun, costs, counts: list[int], folders: dict[int, Path], keys: dict[int, str]) -> dict[int, dict]:
    """Calibrate once, plan each drop count, write each pruned model; the stamps written beside them."""
    from ..hf import load_causal_lm
    from ..skip import hidden_stats, make_plan, prune
    from ..skip.calibration import chunks, tokenize

    run.say(f"planning layer skips ({SKIP_STRATEGY}): drop {', '.join(map(str, counts))} of {costs.num_layers} layers")
    model, tok = load_causal_lm(run.base, with_tokenizer=True)
    seq = min(256, int(getattr(model.config, "max_position_embeddings", 256) or 256))
    stats = hidden_stats(model, chunks(tokenize(tok, calibration_text(run), SKIP_CALIBRATION_TOKENS), seq))
    del model
    out = {}
    for n in counts:
        p = make_plan(costs, SKIP_STRATEGY, stats, model=run.base, drop=n)
        t0 = time.time()
        prune(p, folders[n], force=True)
        info = {"key": keys[n], "plan": p.to_dict(), "prune_seconds": round(time.time() - t0, 2)}
        write_stamp(folders[n], info)
        out[n] = info
    return out


def _speeds(run: DemoRun, folders: dict[int, Path], stamps: dict[int, dict]) -> dict[int, dict]:
    """Decode tokens/s of the full model and each pruned one (cached in each stamp by the settings and the folder)."""

    settings = [SKIP_DECODE_TOKENS, SKIP_DECODE_REPEATS, SKIP_PROMPT_TOKENS]
    dkeys = {n: _hash([settings, _folder_stamp(folders[n]), _folder_stamp(Path(run.base))]) for n in folders}
    out = {n: stamps[n]["decode"] for n in folders if stamps[n].get("decode", {}).get("key") == dkeys[n]}
    todo = [n for n in folders if n not in out]
    if not todo:
        return out
    from ..hf import load_causal_lm

    run.say(f"timing decode: full model vs {', '.join(f'drop-{n}' for n in todo)}")
    base, tok = load_causal_lm(run.base, with_tokenizer=True)
    text = run.texts.get(run.general or "") or next(iter(run.texts.values()))
    prompt = tok(text[: SKIP_PROMPT_TOKENS * 16], add_special_tokens=False)["input_ids"][:SKIP_PROMPT_TOKENS]
    for n in todo:
        pruned = load_causal_lm(folders[n])
        rates = decode_speeds({"full": base, "pruned": pruned}, prompt, SKIP_DECODE_TOKENS, SKIP_DECODE_REPEATS)
        del pruned
        ratios = [p / f for p, f in zip(rates["pruned"], rates["full"]) if f > 0]
        out[n] = {
            "key": dkeys[n],
            "base_tps": round(statistics.median(rates["full"]), 2),
            "tps": round(statistics.median(rates["pruned"]), 2),
            "speedup": round(statistics.median(ratios), 3) if ratios else None,
            "samples": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        }
        stamps[n]["decode"] = out[n]
        write_stamp(folders[n], stamps[n])
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def write_skip_chart(report: dict, path: Path, zoo: str) -> str | None:
    """Left: held-out loss change per domain for each plan; right: decode tokens/s of the full model and each plan."""
    from .charts import pyplot, save_png

    plt = pyplot()
    if plt is None:
        return None
    plans = report["plans"]
    doms = list(report["base"]["loss"])
    L = report["num_layers"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    w = 0.8 / len(plans)
    colors = ["#DD8452", "#C44E52", "#8172B3"]
    for j, p in enumerate(plans):
        xs = [i + (j - (len(plans) - 1) / 2) * w for i in range(len(doms))]
        a1.bar(xs, [p["loss_delta_pct"][d] for d in doms], w, color=colors[j % len(colors)], label=f"drop {p['drop']} of {L} layers")
    a1.axhline(0.0, color="black", lw=0.8)
    a1.set_xticks(range(len(doms)), doms)
    a1.set_ylabel("held-out loss change vs full model (%)")
    a1.legend(fontsize=7, frameon=False)
    names = ["full"] + [f"drop {p['drop']}" for p in plans]
    tps = [statistics.median([p["decode"]["base_tps"] for p in plans])] + [p["decode"]["tps"] for p in plans]
    a2.bar(range(len(names)), tps, color=["#4C72B0"] + [colors[j % len(colors)] for j in range(len(plans))])
    for i, p in enumerate(plans, 1):
        a2.text(i, tps[i], f"{p['decode']['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    a2.set_xticks(range(len(names)), names)
    a2.set_ylabel(f"decode tokens/s ({report['decode_tokens']} new tokens, median)")
    fig.suptitle(f"splice demo — {zoo} zoo: {report['strategy']} layer skipping of the base", fontsize=10)
    return save_png(fig, path)
