"""The demo's ``moe`` part: the zoo's base and experts as one MoE with calibrated routers, against the best merge.

Builds the MoE with ``splice.moe.build_moe`` (``gate_mode: hidden`` from a few
prompts per expert, the first documents of its training text cut short, as a
user would paste them; then ``calibrate`` steps of router training on the
experts' own training text), evaluates it with the same evaluation as the
merges, measures routing accuracy on the held-out text
(``splice.moe.routing.domain_routing``) and writes ``moe.json`` and ``moe.png``.
The build is cached in ``out/moe/`` by its recipe, options and the zoo's model keys.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .demo import DemoRun, _hash, read_stamp, write_stamp

MOE_EXPERTS_PER_TOKEN = 2  # top-k routing: 2 of the experts run per token (mergekit-moe's default)
MOE_CALIBRATE_STEPS = 200  # router training steps; 0 would leave the prompt-made gates (routing accuracy drops)
MOE_CALIBRATION_TOKENS = 2048  # training-text tokens per expert the routers learn from
MOE_PROMPTS = 8  # prompts per expert for the hidden-state gates
MOE_PROMPT_CHARS = 300  # each prompt's length: the start of a training document


def expert_prompts(train_file: Path, n: int = MOE_PROMPTS, chars: int = MOE_PROMPT_CHARS) -> list[str]:
    """The first ``n`` documents (of at least 40 characters) of a zoo training file, cut to ``chars``."""
    from .build import read_jsonl

    out = []
    for row in read_jsonl(train_file):
        t = row["text"].strip()
        if len(t) >= 40:
            out.append(t[:chars])
        if len(out) >= n:
            break
    return out


def moe_recipe(run: DemoRun) -> dict:
    """The MoE recipe (mergekit-moe keys): the base's attention and embeddings, one expert per zoo expert."""
    train = {d: run.zoo_dir / run.manifest["domains"][d]["train_file"] for d in run.experts}
    return {
        "base_model": run.base,
        "gate_mode": "hidden",
        "experts_per_token": min(MOE_EXPERTS_PER_TOKEN, len(run.experts)),
        "experts": [
            {"source_model": path, "positive_prompts": expert_prompts(train[d]), "calibration_file": str(train[d])}
            for d, path in run.experts.items()
        ],
    }


def _sizes(src) -> dict[str, int]:
    return {name: src.info(name).numel for name in src.keys()}


def parameter_counts(path: str | Path) -> tuple[int, int]:
    """(stored parameters, parameters active per token) of a MoE checkpoint.

    Active: everything but the routed experts, plus ``num_experts_per_tok`` of each layer's experts.
    """
    from ..checkpoint import open_model
    from ..moe.families import PROJS, family_of_moe

    src = open_model(path)
    try:
        fam = family_of_moe(src.config, str(path))
        n, k = int(src.config[fam.expert_key]), int(src.config["num_experts_per_tok"])
        sizes = _sizes(src)
        prefix = next(name for name in sizes if ".layers." in name).split(".layers.")[0] + ".layers"
        routed_names = {
            fam.expert_name(prefix, l, e, p) for l in range(int(src.config["num_hidden_layers"])) for e in range(n) for p in PROJS
        }
    finally:
        src.close()
    total = sum(sizes.values())
    routed = sum(v for name, v in sizes.items() if name in routed_names)
    return total, total - routed + round(routed * k / n)


def dense_parameters(path: str | Path) -> int:
    """Stored parameters of a dense checkpoint."""
    from ..checkpoint import open_model

    src = open_model(path)
    try:
        return sum(_sizes(src).values())
    finally:
        src.close()


def run_moe_part(run: DemoRun, best_merge: str | None, *, chart: bool = True) -> dict:
    """Build (or reuse) the MoE, evaluate it, measure its routing; write ``moe.json`` (+ ``moe.png``); return the report."""
    from ..eval.results import write_text_atomic
    from ..moe import build_moe

    recipe = moe_recipe(run)
    build_opts = {"calibrate": MOE_CALIBRATE_STEPS, "calibration_tokens": MOE_CALIBRATION_TOKENS, "seed": run.seed}
    d = run.out / "moe" / f"top{recipe['experts_per_token']}-cal{MOE_CALIBRATE_STEPS}"
    key = _hash([recipe, build_opts, *run.input_key()])
    info = read_stamp(d)
    if info.get("key") != key:
        run.say(f"building the MoE: {len(run.experts)} experts, top-{recipe['experts_per_token']}, {MOE_CALIBRATE_STEPS} calibration steps")
        t0 = time.time()
        s = build_moe(recipe, d, force=True, quiet=True, **build_opts)
        info = {"key": key, "seconds": round(time.time() - t0, 2), "calibration": s.get("calibration"), "recipe": recipe}
        write_stamp(d, info)

    label = "moe"
    r = run.evaluate(label, str(d), "moe")
    routing = _routing(run, d, key)
    names = [label] + ([best_merge] if best_merge else [])
    sc = run.scores(names)
    total, active = parameter_counts(d)
    dense = dense_parameters(run.base)
    per = {dom: {"mean": round(sum(v) / len(v), 4), "per_layer": [round(x, 4) for x in v]} for dom, v in routing.items() if v}
    report = {
        "path": str(d),
        "experts": list(run.experts),
        "experts_per_token": recipe["experts_per_token"],
        "gate_mode": recipe["gate_mode"],
        "calibrate_steps": MOE_CALIBRATE_STEPS,
        "calibration_tokens_per_expert": MOE_CALIBRATION_TOKENS,
        "calibration": info.get("calibration"),
        "build_seconds": info["seconds"],
        "params": total,
        "active_params": active,
        "dense_params": dense,
        "losses": {dom: v["loss"] for dom, v in r["domains"].items()},
        "tasks": {t: v["acc"] for t, v in r["tasks"].items()},
        "scores": sc[label],
        "routing": per,
        "routing_accuracy": round(sum(v["mean"] for v in per.values()) / len(per), 4) if per else None,
        "best_merge": None,
        "eval": run.ev,
    }
    if best_merge:
        m = run.results[best_merge]
        report["best_merge"] = {
            "name": best_merge,
            "params": dense,
            "losses": {dom: v["loss"] for dom, v in m["domains"].items()},
            "tasks": {t: v["acc"] for t, v in m["tasks"].items()},
            "scores": sc[best_merge],
        }
    write_text_atomic(run.out / "moe.json", json.dumps(report, indent=2) + "\n")
    if chart:
        report["chart"] = write_moe_chart(report, run.out / "moe.png", run.zoo)
    return report


def _routing(run: DemoRun, moe_dir: Path, key: str) -> dict[str, list[float]]:
    """Held-out routing per expert domain, cached beside the MoE (keyed by its build and the evaluation settings)."""
    from ..eval.results import write_text_atomic
    from ..hf import load_causal_lm
    from ..moe.routing import domain_routing

    f = moe_dir / ".routing.json"
    rkey = _hash([key, run.ev, sorted(run.domains.items())])
    cached = json.loads(f.read_text()) if f.exists() else {}
    if cached.get("key") == rkey:
        return cached["routing"]
    run.say("measuring the MoE's routing on held-out text")
    model, tok = load_causal_lm(moe_dir, with_tokenizer=True)
    ctx = getattr(model.config, "max_position_embeddings", None) or run.ev["seq_len"]
    own = {dom: i for i, dom in enumerate(run.experts)}  # the recipe lists the experts in this order
    routing = domain_routing(model, tok, run.texts, own, seq_len=min(run.ev["seq_len"], int(ctx)), max_tokens=run.ev["max_tokens"])
    del model
    write_text_atomic(f, json.dumps({"key": rkey, "routing": routing}) + "\n")
    return routing


def write_moe_chart(report: dict, path: Path, zoo: str) -> str | None:
    """Per expert domain: normalized score of the MoE, the best merge and the expert (1 by definition); routing beside it."""
    from .charts import pyplot, save_png

    plt = pyplot()
    if plt is None:
        return None
    doms = report["experts"]
    x = list(range(len(doms)))
    bm = report.get("best_merge")
    series = [("each domain's own expert", [1.0] * len(doms), "#8C8C8C")]
    if bm:
        series.append((f"best merge: {bm['name']}", [bm["scores"]["per_domain"].get(d) for d in doms], "#4C72B0"))
    series.append(
        (f"MoE (top-{report['experts_per_token']} of {len(doms)})", [report["scores"]["per_domain"].get(d) for d in doms], "#DD8452")
    )
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    w = 0.8 / len(series)
    for j, (name, vals, color) in enumerate(series):
        a1.bar([i + (j - (len(series) - 1) / 2) * w for i in x], [v if v is not None else 0.0 for v in vals], w, label=name, color=color)
    a1.axhline(0.0, color="black", lw=0.8)
    a1.set_ylim(top=1.35)  # room for the legend above the experts' bars
    a1.set_xticks(x, doms)
    a1.set_ylabel("normalized score (share of the expert's gain kept)")
    a1.legend(fontsize=7, frameon=False, loc="upper center", ncol=len(series))
    acc = [report["routing"].get(d, {}).get("mean") for d in doms]
    a2.bar(x, [100 * (v or 0.0) for v in acc], color="#55A868")
    a2.axhline(100.0 / len(doms), color="grey", lw=0.8, ls="--", label="chance (1 / experts)")
    a2.set_xticks(x, doms)
    a2.set_ylim(0, 100)
    a2.set_ylabel("tokens routed to the domain's expert (%)")
    a2.legend(fontsize=7, frameon=False, loc="lower right")
    fig.suptitle(f"splice demo — {zoo} zoo: MoE of {len(doms)} experts vs the best merge (held-out text)", fontsize=10)
    return save_png(fig, path)
