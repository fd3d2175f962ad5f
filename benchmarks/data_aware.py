"""Data-aware merging on a zoo: RegMean and Fisher from a calibration pass against data-free merges.

Each expert is calibrated once (``splice.calibrate``, with ``fisher=True`` so the same windows
give both the Grams and the Fisher) on ``--tokens`` tokens of its own domain's training text
(``data/<domain>/train.jsonl``, seed ``--seed``). The experts are merged with ``regmean`` at each
``--alpha`` (and RegMean++, ``sequential: true``, at each ``--sequential-alpha``), with ``fisher``,
and with the data-free methods ``--data-free`` (the demo leaderboard's recipes for them, equal
weights, base where the method takes one). Every merge is evaluated on the zoo's held-out text
with ``splice eval``'s normalized score (the share of each expert's gain over the base the merge
keeps on that expert's domain: mean, worst domain) and forgetting on the general domain. A
Markdown table goes to stdout, the full results to ``--out`` (JSON).

    OMP_NUM_THREADS=1 python benchmarks/data_aware.py --zoo $SPLICE_TEST_ZOO --tokens 16384 \\
        --alpha 0.9,1.0,0.5,0.1 --out benchmarks/results/data-aware-tiny.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import yaml

import splice
from splice.eval import evaluate
from splice.zoo import zoo_paths
from splice.zoo.demo import demo_recipes

DATA_FREE = "linear,task_arithmetic,ties,karcher"


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", required=True, help="a built zoo folder (splice zoo build tiny)")
    ap.add_argument("--tokens", type=int, default=16384, help="calibration tokens per expert (default 16384)")
    ap.add_argument("--seed", type=int, default=0, help="calibration window seed (default 0)")
    ap.add_argument("--alpha", default="0.9", help="comma-separated regmean alphas (default 0.9)")
    ap.add_argument("--sequential-alpha", default="", help="comma-separated alphas for RegMean++ (sequential: true); default none")
    ap.add_argument("--no-fisher", action="store_true", help="skip the fisher merge (and the backward passes it needs)")
    ap.add_argument("--data-free", default=DATA_FREE, help=f"comma-separated data-free methods (default {DATA_FREE})")
    ap.add_argument(
        "--learn",
        default="",
        help="comma-separated START:task|layer merges with learned weights (learn:), START a demo recipe's label or method "
        "(its first recipe), e.g. 'task_arithmetic (lambda=1):task,ties:layer'; default none",
    )
    ap.add_argument("--learn-steps", type=int, default=None, help="learn: steps (default: splice's)")
    ap.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per domain (default: all)")
    ap.add_argument("--work", default=None, help="folder for statistics and merges (default: a temporary one)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    zp = zoo_paths(args.zoo)
    man = zp["manifest"]
    experts = {d: str(zp["models"][d]) for d in man["experts"]}
    base = str(zp["models"]["base"])
    work = Path(args.work or tempfile.mkdtemp(prefix="splice-data-aware-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stats, calib_s = {}, {}
    for d, model in experts.items():
        stats[d] = work / f"{d}.stats.safetensors"
        s = splice.calibrate(
            model,
            Path(args.zoo) / "data" / d / "train.jsonl",
            stats[d],
            tokens=args.tokens,
            seed=args.seed,
            fisher=not args.no_fisher,
            quiet=True,
            force=True,
        )
        calib_s[d] = round(s["seconds"], 2)
    calibration = {m: str(stats[d]) for d, m in experts.items()}
    wanted = [m for m in args.data_free.split(",") if m]
    merges = {label: r for label, r in demo_recipes(base, list(experts.values())) if r["merge_method"] in wanted}
    for a in floats(args.alpha):
        merges[f"regmean (alpha={a:g})"] = {
            "merge_method": "regmean",
            "models": [{"model": m} for m in experts.values()],
            "parameters": {"alpha": a},
            "calibration": calibration,
        }
    for a in floats(args.sequential_alpha):
        merges[f"regmean++ (alpha={a:g})"] = {
            "merge_method": "regmean",
            "models": [{"model": m} for m in experts.values()],
            "parameters": {"alpha": a, "sequential": True},
            "calibration": {
                m: {"text": str(Path(args.zoo) / "data" / d / "train.jsonl"), "tokens": args.tokens, "seed": args.seed}
                for d, m in experts.items()
            },
        }
    texts = {
        m: {"text": str(Path(args.zoo) / "data" / d / "train.jsonl"), "tokens": args.tokens, "seed": args.seed} for d, m in experts.items()
    }
    all_recipes = dict(demo_recipes(base, list(experts.values())))
    for item in [x for x in args.learn.split(",") if x.strip()]:
        method, _, gran = item.rpartition(":") if ":" in item else (item, "", "")
        start = all_recipes.get(method) or next((r for r in all_recipes.values() if r["merge_method"] == method), None)
        if start is None:
            ap.error(f"--learn: the demo has no recipe {method!r} (a label such as 'ties (density=0.5)' or a method)")
        learn = {"weights": gran or "layer"}
        if args.learn_steps is not None:
            learn["steps"] = args.learn_steps
        merges[f"{method} learned ({learn['weights']})".replace(") learned (", ", learned ")] = {
            **start,
            "learn": learn,
            "calibration": texts,
        }
    if not args.no_fisher:
        merges["fisher"] = {"merge_method": "fisher", "models": [{"model": m} for m in experts.values()], "calibration": calibration}
    folders, merge_s = {}, {}
    for name, recipe in merges.items():
        folders[name] = work / "".join(c if c.isalnum() or c in "-_." else "_" for c in name.replace("++", "pp")).strip("_")
        p = work / f"{folders[name].name}.yaml"
        p.write_text(yaml.safe_dump(recipe, sort_keys=False))
        t = time.perf_counter()
        splice.merge(p, folders[name], quiet=True, force=True)
        merge_s[name] = round(time.perf_counter() - t, 2)
    # held-out domains only (the zoo's multiple-choice task is slow and not what merging is scored on here)
    res = evaluate(
        [*experts.values(), *(str(f) for f in folders.values())],  # experts scored too: the gains are theirs
        domains={d: str(p) for d, p in zp["heldout"].items()},
        max_tokens=args.eval_tokens,
        quiet=True,
        base=base,
        experts=experts,
        general=man["general_domain"],
        names={**{str(p): k for k, p in zp["models"].items()}, **{str(f): n for n, f in folders.items()}},
    )
    rows = []
    for name in merges:
        sc = res["models"][name]["scores"]
        rows.append(
            {
                "merge": name,
                "normalized": sc["normalized"],
                "worst": sc["min_normalized"],
                "forgetting": sc.get("forgetting"),
                "per_domain": sc["per_domain"],
            }
        )
    command = "OMP_NUM_THREADS=1 python benchmarks/data_aware.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"`{command}`\n")
    print(
        f"zoo {man.get('tier', '?')}: {len(experts)} experts ({', '.join(experts)}), calibration {args.tokens} tokens each "
        f"(seed {args.seed}), held-out tokens per domain {args.eval_tokens or 'all'}"
    )
    print()
    print("| merge | normalized mean | worst domain | forgetting | per domain |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        forg = r["forgetting"]
        per = ", ".join(f"{k} {v:.3f}" for k, v in r["per_domain"].items())
        print(f"| {r['merge']} | {r['normalized']:.3f} | {r['worst']:.3f} | {forg if forg is None else f'{forg:+.4f}'} | {per} |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all; calibration seconds per expert {calib_s}", file=sys.stderr)
    if args.out:
        from splice.eval import write_json

        write_json(
            {
                "command": command,
                "zoo": man.get("tier"),
                "experts": list(experts),
                "tokens": args.tokens,
                "seed": args.seed,
                "eval_tokens": args.eval_tokens,
                "rows": rows,
                "recipes": merges,
                "eval": res,
            },
            args.out,
            force=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
