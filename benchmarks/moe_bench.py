"""splice moe on the model zoo: per-domain loss, normalized scores, routing accuracy, compression.

    python benchmarks/moe_bench.py --tier smol            # real SmolLM2-135M experts (code, news, scripture)
    python benchmarks/moe_bench.py --tier tiny            # the small Llama zoo trained here

Builds (in ``--work``, default ``benchmarks/.work/moe-<tier>``):

- MoEs of the zoo's base and its experts, ``gate_mode: hidden`` with a few
  prompts per expert (the first documents of the expert's training text, cut
  short, as a user would paste them), top-2 and top-1, each without and with
  ``--calibrate`` on the expert's training text;
- the usual merges of the same experts (linear, task_arithmetic, ties), the
  best of which is the baseline a MoE has to beat;
- ``moe-compress`` of the best calibrated MoE down to each smaller expert count.

Evaluates every model on each domain's held-out text (never trained on, never
used for prompts or calibration) with the same windows as ``splice eval``,
reports loss per domain, the normalized score (share of each expert's
improvement over the base kept on its own domain) and, for MoEs, routing
accuracy: the share of a domain's held-out tokens whose top-1 expert is that
domain's expert, per layer, averaged over all layers and over the layers where
the experts differ. Writes JSON (``--json``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))


def prompts_from(train_jsonl: Path, n: int, chars: int) -> list[str]:
    out = []
    for line in train_jsonl.read_text(encoding="utf-8").splitlines():
        if line.strip():
            t = json.loads(line)["text"].strip()
            if len(t) >= 40:
                out.append(t[:chars])
        if len(out) >= n:
            break
    return out


def eval_model(path: Path, texts: dict[str, str], *, seq_len: int, max_tokens: int, batch: int, own: dict[str, int] | None) -> dict:
    """Loss per domain (splice eval's windows and formula); for a MoE also routing per layer on ``own`` domains."""
    import torch
    import torch.nn.functional as F

    from splice.eval.perplexity import padded_batch, windows
    from splice.hf import load_causal_lm

    model, tok = load_causal_lm(path, with_tokenizer=True)
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = {}
    for dom, text in texts.items():
        wins, _ = windows(tok, text, seq_len, max_tokens)
        nll = 0.0
        ntok = 0
        hits = None
        count = 0
        with torch.inference_mode():
            for b in range(0, len(wins), batch):
                ids, mask = padded_batch(wins[b : b + batch], pad)
                want_routes = own is not None and dom in own
                res = (
                    model(input_ids=ids, attention_mask=mask, output_router_logits=want_routes)
                    if want_routes
                    else model(input_ids=ids, attention_mask=mask)
                )
                lp = F.cross_entropy(res.logits.float()[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
                m = mask[:, 1:].float()
                nll += float((lp * m).sum())
                ntok += int(m.sum())
                if want_routes:
                    valid = mask.reshape(-1).bool()
                    per = torch.stack([(r.reshape(-1, r.shape[-1]).argmax(-1)[valid] == own[dom]).float().sum() for r in res.router_logits])
                    hits = per if hits is None else hits + per
                    count += int(valid.sum())
        row = {"loss": round(nll / ntok, 5), "tokens": ntok}
        if hits is not None:
            row["routing_per_layer"] = [round(float(h) / count, 4) for h in hits]
        out[dom] = row
    del model
    return out


def differing_layers(moe: Path) -> list[int]:
    """Layers whose experts are not all identical (routing only matters there)."""
    import torch

    from splice.checkpoint import open_model
    from splice.moe.families import family_of_moe

    src = open_model(moe)
    fam = family_of_moe(src.config, str(moe))
    n = src.config[fam.expert_key]
    prefix = next(k for k in src.keys() if ".layers." in k).split(".layers.")[0] + ".layers"
    out = []
    for l in range(src.config["num_hidden_layers"]):
        w = [src.get(fam.expert_name(prefix, l, e, "down")) for e in range(n)]
        if any(not torch.equal(w[0], x) for x in w[1:]):
            out.append(l)
    src.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tier", default="smol", choices=["tiny", "smol"])
    ap.add_argument("--zoo", default=None, help="built zoo folder (default: the tier's cache folder)")
    ap.add_argument("--work", default=None, help="where models are built (default benchmarks/.work/moe-<tier>)")
    ap.add_argument("--json", default=None, help="results file (default benchmarks/results/moe-<tier>.json)")
    ap.add_argument("--max-tokens", type=int, default=2048, help="held-out tokens per domain (default 2048)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per expert for the hidden gates (default 8)")
    ap.add_argument("--prompt-chars", type=int, default=300)
    ap.add_argument("--calibrate", type=int, default=200, help="router calibration steps (default 200)")
    ap.add_argument("--calibration-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--top-k", default="2,1", help="experts_per_token values to build (default 2,1)")
    ap.add_argument("--merges", default="linear,task_arithmetic,ties", help="merges to compare with ('' for none)")
    ap.add_argument("--force", action="store_true", help="rebuild models that exist")
    args = ap.parse_args()

    import torch

    import splice
    from splice.eval import normalized_scores
    from splice.eval.perplexity import read_text
    from splice.moe import build_moe, compress_moe
    from splice.zoo import default_zoo_dir, zoo_paths

    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = Path(args.zoo) if args.zoo else default_zoo_dir(args.tier)
    paths = zoo_paths(zoo)
    man = paths["manifest"]
    work = Path(args.work) if args.work else HERE / ".work" / f"moe-{args.tier}"
    work.mkdir(parents=True, exist_ok=True)
    models = paths["models"]
    experts = [d for d in models if d != "base"]
    general = man.get("general_domain") or ("general" if "general" in paths["heldout"] else None)
    domains = experts + ([general] if general else [])
    texts = {d: read_text(paths["heldout"][d]) for d in domains}
    train = {d: zoo / "data" / d / "train.jsonl" for d in experts}
    timings: dict[str, float] = {}

    def recipe(k: int) -> dict:
        return {
            "base_model": str(models["base"]),
            "gate_mode": "hidden",
            "experts_per_token": k,
            "experts": [
                {
                    "source_model": str(models[d]),
                    "positive_prompts": prompts_from(train[d], args.prompts, args.prompt_chars),
                    "calibration_file": str(train[d]),
                }
                for d in experts
            ],
        }

    built: dict[str, Path] = {"base": models["base"], **{d: models[d] for d in experts}}
    moes: list[str] = []
    calib_info: dict[str, dict] = {}
    for k in [int(x) for x in args.top_k.split(",") if x]:
        for steps in (0, args.calibrate):
            name = f"moe-top{k}" + (f"-cal{steps}" if steps else "")
            out = work / name
            rp = work / f"{name}.yaml"
            rp.write_text(yaml.safe_dump(recipe(k), sort_keys=False, allow_unicode=True))
            if args.force or not (out / "config.json").exists():
                t0 = time.time()
                s = build_moe(
                    rp, out, force=True, quiet=True, calibrate=steps, calibration_tokens=args.calibration_tokens, threads=args.threads
                )
                timings[f"build {name}"] = round(time.time() - t0, 1)
                if "calibration" in s:
                    calib_info[name] = s["calibration"]
            built[name] = out
            moes.append(name)

    merges = []
    wanted = [m for m in args.merges.split(",") if m]
    if wanted:
        base = str(models["base"])
        ex = [str(models[d]) for d in experts]
        mrecipes = {
            "merge-linear": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in ex]},
            "merge-task_arithmetic": {
                "merge_method": "task_arithmetic",
                "base_model": base,
                "models": [{"model": m, "parameters": {"weight": 1.0}} for m in ex],
            },
            "merge-ties": {
                "merge_method": "ties",
                "base_model": base,
                "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in ex],
                "parameters": {"normalize": True},
            },
        }
        for name, r in mrecipes.items():
            if name.split("-", 1)[1] not in wanted:
                continue
            out = work / name
            if args.force or not (out / "config.json").exists():
                t0 = time.time()
                splice.merge(r, out, force=True, quiet=True)
                timings[f"build {name}"] = round(time.time() - t0, 1)
            built[name] = out
            merges.append(name)

    losses: dict[str, dict[str, float]] = {}
    routing: dict[str, dict] = {}
    results: dict[str, dict] = {}

    def evaluate(name: str, own: dict | None):
        t0 = time.time()
        r = eval_model(built[name], texts, seq_len=args.seq_len, max_tokens=args.max_tokens, batch=args.batch, own=own)
        timings[f"eval {name}"] = round(time.time() - t0, 1)
        results[name] = r
        losses[name] = {d: v["loss"] for d, v in r.items()}
        print(f"[moe_bench] {name}: " + ", ".join(f"{d} {v['loss']:.4f}" for d, v in r.items()), file=sys.stderr, flush=True)

    own = {d: i for i, d in enumerate(experts)}
    for name in ["base", *experts, *merges]:
        evaluate(name, None)
    for name in moes:
        evaluate(name, own)
    diff = differing_layers(built[moes[0]])

    def scores():
        return normalized_scores(losses, "base", {d: d for d in experts}, general=general)

    # compress the best calibrated MoE
    sc = scores()
    cal = [m for m in moes if "-cal" in m] or moes
    best_moe = max(cal, key=lambda m: sc[m]["normalized"])
    compressed = []
    cal_file = work / "compress-calibration.jsonl"
    with open(cal_file, "w", encoding="utf-8") as f:
        for d in experts:
            for line in train[d].read_text(encoding="utf-8").splitlines()[:20]:
                f.write(line + "\n")
    for k in range(len(experts) - 1, 0, -1):
        name = f"{best_moe}-compress{k}"
        out = work / name
        if args.force or not (out / "config.json").exists():
            t0 = time.time()
            compress_moe(built[best_moe], out, experts=k, calibration=[cal_file], tokens=4096, force=True, quiet=True, threads=args.threads)
            timings[f"build {name}"] = round(time.time() - t0, 1)
        built[name] = out
        compressed.append(name)
        evaluate(name, None)  # compressed experts are groups: no single 'own' expert per domain

    sc = scores()
    for name in moes:
        per = {}
        for d in experts:
            rl = results[name][d].get("routing_per_layer")
            if rl:
                per[d] = {
                    "all_layers": round(sum(rl) / len(rl), 4),
                    "differing_layers": round(sum(rl[l] for l in diff) / max(1, len(diff)), 4) if diff else None,
                    "min_layer": min(rl),
                }
        routing[name] = per

    best_merge = max(merges, key=lambda m: sc[m]["normalized"]) if merges else None
    report = {
        "tier": args.tier,
        "zoo": str(zoo),
        "experts": experts,
        "general": general,
        "max_tokens_per_domain": args.max_tokens,
        "seq_len": args.seq_len,
        "calibrate_steps": args.calibrate,
        "calibration_tokens_per_expert": args.calibration_tokens,
        "prompts_per_expert": args.prompts,
        "layers_where_experts_differ": diff,
        "losses": losses,
        "scores": sc,
        "routing": routing,
        "calibration": calib_info,
        "best_merge": best_merge,
        "best_moe": best_moe,
        "timings_s": timings,
        "threads": torch.get_num_threads(),
    }
    js = Path(args.json) if args.json else HERE / "results" / f"moe-{args.tier}.json"
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(report, indent=1) + "\n")

    # tables
    cols = experts + ([general] if general else [])
    print(f"\nloss per domain (held-out, {args.max_tokens} tokens each), normalized score on the expert domains:\n")
    print("| model | " + " | ".join(cols) + " | normalized (mean) | min over domains |")
    print("|---|" + "---|" * (len(cols) + 2))
    for name in ["base", *experts, *merges, *moes, *compressed]:
        s = sc[name]
        mark = " (best merge)" if name == best_merge else ""
        print(
            f"| {name}{mark} | "
            + " | ".join(f"{losses[name][d]:.4f}" for d in cols)
            + f" | {s['normalized']:.3f} | {s['min_normalized']:.3f} |"
        )
    print(
        "\nrouting accuracy (share of a domain's held-out tokens whose top-1 expert is its own; mean over all layers / over the layers where experts differ):\n"
    )
    print("| model | " + " | ".join(experts) + " |")
    print("|---|" + "---|" * len(experts))
    for name in moes:
        print(
            f"| {name} | "
            + " | ".join(f"{routing[name][d]['all_layers']:.1%} / {routing[name][d]['differing_layers'] or 0:.1%}" for d in experts)
            + " |"
        )
    print(f"\nresults: {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
