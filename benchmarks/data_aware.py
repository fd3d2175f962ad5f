"""Data-aware merging on a zoo: RegMean from a calibration pass against the data-free ``linear``.

Each expert is calibrated (``splice.calibrate``) on ``--tokens`` tokens of its own domain's
training text (``data/<domain>/train.jsonl``, seed ``--seed``); the experts are merged with
``regmean`` at each ``--alpha`` and with ``linear`` (equal weights); every merge is evaluated
on the zoo's held-out text with ``splice eval``'s normalized score (the share of each
expert's gain over the base the merge keeps on that expert's domain: mean, worst domain)
and forgetting on the general domain. A Markdown table goes to stdout, the full results
to ``--out`` (JSON).

    SPLICE_TEST_ZOO=... python benchmarks/data_aware.py --zoo $SPLICE_TEST_ZOO --tokens 16384
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

import splice
from splice.eval import evaluate
from splice.zoo import zoo_paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", required=True, help="a built zoo folder (splice zoo build tiny)")
    ap.add_argument("--tokens", type=int, default=16384, help="calibration tokens per expert (default 16384)")
    ap.add_argument("--seed", type=int, default=0, help="calibration window seed (default 0)")
    ap.add_argument("--alpha", default="0.9", help="comma-separated regmean alphas (default 0.9)")
    ap.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per domain (default: all)")
    ap.add_argument("--work", default=None, help="folder for statistics and merges (default: a temporary one)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    zp = zoo_paths(args.zoo)
    man = zp["manifest"]
    experts = {d: zp["models"][d] for d in man["experts"]}
    work = Path(args.work or tempfile.mkdtemp(prefix="splice-data-aware-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stats, calib_s = {}, {}
    for d, model in experts.items():
        stats[d] = work / f"{d}.stats.safetensors"
        s = splice.calibrate(
            model, Path(args.zoo) / "data" / d / "train.jsonl", stats[d], tokens=args.tokens, seed=args.seed, quiet=True, force=True
        )
        calib_s[d] = round(s["seconds"], 2)
    merges = {"linear": {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in experts.values()]}}
    for a in [float(x) for x in args.alpha.split(",")]:
        merges[f"regmean a={a:g}"] = {
            "merge_method": "regmean",
            "models": [{"model": str(m)} for m in experts.values()],
            "parameters": {"alpha": a},
            "calibration": {str(m): str(stats[d]) for d, m in experts.items()},
        }
    folders = {}
    for name, recipe in merges.items():
        folders[name] = work / name.replace(" ", "_").replace("=", "")
        p = work / f"{folders[name].name}.yaml"
        p.write_text(yaml.safe_dump(recipe, sort_keys=False))
        splice.merge(p, folders[name], quiet=True, force=True)
    # held-out domains only (the zoo's multiple-choice task is slow and not what merging is scored on here)
    res = evaluate(
        [*(str(m) for m in experts.values()), *(str(f) for f in folders.values())],  # experts scored too: the gains are theirs
        domains={d: str(p) for d, p in zp["heldout"].items()},
        max_tokens=args.eval_tokens,
        quiet=True,
        base=str(zp["models"]["base"]),
        experts={d: str(m) for d, m in experts.items()},
        general=man["general_domain"],
        names={**{str(p): k for k, p in zp["models"].items()}, **{str(f): n for n, f in folders.items()}},
    )
    rows = []
    for name in merges:
        sc = res["models"][name]["scores"]
        rows.append((name, sc["normalized"], sc["min_normalized"], sc.get("forgetting"), sc["per_domain"]))
    print(
        f"zoo {args.zoo}: {len(experts)} experts, calibration {args.tokens} tokens each (seed {args.seed}), held-out tokens {args.eval_tokens or 'all'}"
    )
    print()
    print("| merge | normalized mean | worst domain | forgetting | per domain |")
    print("|---|---:|---:|---:|---|")
    for name, mean, worst, forg, per in rows:
        print(
            f"| {name} | {mean:.3f} | {worst:.3f} | {forg if forg is None else f'{forg:+.4f}'} | {', '.join(f'{k} {v:.3f}' for k, v in per.items())} |"
        )
    print(f"\n{time.perf_counter() - t0:.0f} s in all; calibration seconds per expert {calib_s}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(
            json.dumps({"tokens": args.tokens, "seed": args.seed, "rows": rows, "calibration_seconds": calib_s, "eval": res}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
