"""Which tiny-tier design makes the tiny zoo behave like the real one (issue 14).

For each candidate design (the ``tiny`` tier with some fields replaced), build a zoo in
``--work/<name>`` (resumable), run the demo's merge leaderboard on it (every data-free method,
the demo's sweeps and evaluation), and compare its ranking with the real-model leaderboard
``--reference`` (the ``smol`` zoo's, SmolLM2-135M): Spearman rank correlation of the normalized
scores over the merges both boards hold, how many merges fall below the base, the winner, and
the build's seconds. A Markdown table goes to stdout, everything to ``--out`` (JSON).

    OMP_NUM_THREADS=1 python benchmarks/tiny_design.py --threads 1 --out benchmarks/results/tiny-design.json

Candidates are given as ``name:field=value,field=value`` (``--design``, repeatable); the
defaults compare the tier before issue 14 (full fine-tunes of a 200-step base) with the
current one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

from scipy.stats import spearmanr

from splice.zoo import build as zb
from splice.zoo.demo import run_demo

HERE = Path(__file__).resolve().parent
DEFAULT_DESIGNS = [
    "before:base_steps=200,expert_lr=3e-4,expert_trainable=all,expert_replay=0",
    "current:",
]


def parse_design(spec: str) -> tuple[str, dict]:
    name, _, body = spec.partition(":")
    fields = {f.name: f.type for f in dataclasses.fields(zb.Tier)}
    over: dict = {}
    for item in filter(None, body.split(",")):
        k, _, v = item.partition("=")
        if k not in fields:
            raise SystemExit(f"--design {spec}: unknown tier field {k!r}")
        cur = getattr(zb.TIERS["tiny"], k)
        over[k] = type(cur)(v) if not isinstance(cur, str) else v
    return name, over


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--design", action="append", help="name:field=value,... (repeatable)")
    ap.add_argument("--reference", default=str(HERE / "results" / "demo-smol.json"))
    ap.add_argument("--work", default=str(HERE.parent / ".cache" / "tiny-design"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    ref = json.loads(Path(args.reference).read_text())
    ref_scores = {n: ref["models"][n]["scores"]["normalized"] for n in ref["ranking"]}
    rows = []
    for spec in args.design or DEFAULT_DESIGNS:
        name, over = parse_design(spec)
        tier_name = f"tiny-{name}"
        zb.TIERS[tier_name] = dataclasses.replace(zb.TIERS["tiny"], name=tier_name, **over)
        zdir = Path(args.work) / name
        t0 = time.time()
        man = zb.build_zoo(tier_name, zdir, seed=0, quiet=True, threads=args.threads)
        build_s = man["first_build_seconds"]["total"]
        t1 = time.time()
        res = run_demo(tier_name, zdir.with_name(name + "-demo"), zoo_dir=zdir, quiet=True, chart=False, force=True)
        demo_s = time.time() - t1
        scores = {n: res["models"][n]["scores"] for n in res["ranking"]}
        common = [n for n in res["ranking"] if n in ref_scores]
        rho = spearmanr([scores[n]["normalized"] for n in common], [ref_scores[n] for n in common]).statistic
        w = res["winner"]
        rows.append(
            {
                "design": name,
                "overrides": over,
                "tier": dataclasses.asdict(zb.TIERS[tier_name]),
                "spearman_vs_reference": round(float(rho), 3),
                "merges_compared": len(common),
                "below_base": sum(1 for n in common if scores[n]["normalized"] < 0),
                "winner": w,
                "winner_normalized": scores[w]["normalized"],
                "winner_worst": scores[w]["min_normalized"],
                "winner_forgetting": scores[w]["forgetting"],
                "experts_normalized": {d: res["models"][f"expert:{d}"]["scores"]["normalized"] for d in res["experts"]},
                "scores": {n: {k: s[k] for k in ("normalized", "min_normalized", "forgetting")} for n, s in scores.items()},
                "build_seconds": build_s,
                "build_stage_seconds": man["first_build_seconds"],
                "demo_seconds": round(demo_s, 1),
                "wall_seconds": round(time.time() - t0, 1),
            }
        )
        print(f"[tiny-design] {name}: rho {rho:.3f}, winner {w} {scores[w]['normalized']:.3f}", file=sys.stderr, flush=True)
    ref_below = sum(1 for v in ref_scores.values() if v < 0)
    lines = [
        f"reference: {ref['zoo']} zoo, winner {ref['winner']} {ref_scores[ref['winner']]:.3f}, {ref_below}/{len(ref_scores)} below base",
        "",
        "| design | Spearman vs reference | below base | winner (mean / worst / forgetting) | build s | demo s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['design']} | {r['spearman_vs_reference']:.2f} | {r['below_base']}/{r['merges_compared']} | "
            f"{r['winner']} ({r['winner_normalized']:.2f} / {r['winner_worst']:.2f} / {100 * r['winner_forgetting']:+.1f}%) | "
            f"{r['build_seconds']:.0f} | {r['demo_seconds']:.0f} |"
        )
    print("\n".join(lines))
    if args.out:
        out = {
            "command": "python benchmarks/tiny_design.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "threads": args.threads,
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            "reference": args.reference,
            "designs": rows,
            "table": "\n".join(lines),
        }
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
