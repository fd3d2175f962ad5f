"""Benchmark ``splice search``'s evaluation: seconds per candidate in memory against merge-to-disk and reload.

For the same candidates (random points of a merge space, and random drop sets of a
drop space), two ways to score each one on the same search windows:

* ``resident``: what ``splice search`` does: the candidate merged into the one resident
  model (only tensors whose job changed are recomputed; a drop set bypasses layers of
  the resident base), then scored;
* ``disk``: what mergekit-evolve does: ``splice merge`` writes the candidate to a folder,
  ``transformers`` loads it (``splice.hf.load_causal_lm``), then it is scored.

Both give the same losses (the largest difference is printed as a check); the timing is
the median over the candidates, after one warm-up candidate per path. Default zoo: the
test zoo's tiny tier (``SPLICE_TEST_ZOO``), else ``~/.cache/splice/zoo/tiny``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search_bench.py --threads 1
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


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def default_zoo() -> Path:
    env = os.environ.get("SPLICE_TEST_ZOO")
    return Path(env) if env else Path.home() / ".cache" / "splice" / "zoo" / "tiny"


def spec_for(zoo: Path, tokens: int, seq_len: int, space: dict):
    from splice.search.spec import parse_spec

    data = {"zoo": str(zoo), "evaluation": {"tokens": tokens, "seq_len": seq_len}, "space": space, "threads": 1}
    return parse_spec(data, folder=zoo)


def disk_losses(recipe: dict, folder: Path, windows: dict, batch_size: int, threads: int) -> dict[str, float]:
    """Merge ``recipe`` to ``folder``, load it with transformers, score it: the merge-to-disk path."""
    from splice.engine import run_merge
    from splice.engine.write import torch_threads
    from splice.eval.perplexity import nll_windows
    from splice.hf import load_causal_lm

    run_merge(recipe, folder, force=True, quiet=True, workers=1)
    model, tok = load_causal_lm(str(folder), with_tokenizer=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out = {}
    with torch_threads(threads):
        for d, wins in windows.items():
            res = nll_windows(model, wins, batch_size, pad)
            out[d] = sum(r[0] for r in res) / max(1, sum(r[1] for r in res))
    return out


def bench(part: str, args) -> dict:
    import random

    from splice.eval.perplexity import read_text
    from splice.search.optimizers import suggest_random
    from splice.search.resident import ResidentModel
    from splice.search.splits import make_splits
    from splice.search.study import make_space

    space_spec = {"methods": ["linear", "ties"], "granularity": {"groups": 2}} if part == "merge" else {"drop": {"count": args.drop}}
    spec = spec_for(args.zoo, args.tokens, args.seq_len, space_spec)
    space = make_space(spec)
    suggest = suggest_random(random.Random(args.seed))
    candidates = [space.propose(suggest) for _ in range(args.candidates + 1)]  # the first is the warm-up

    resident = ResidentModel(spec.base, list(spec.experts.values()) if part == "merge" else [], threads=args.threads, batch_size=8)
    try:
        texts = {d: read_text(p) for d, p in spec.domains.items()}
        windows = make_splits(resident.tokenizer, texts, spec.seq_len, spec.search_share, spec.tokens).search
        mem, mem_losses = [], []
        for c in candidates:
            t0 = time.perf_counter()
            if part == "merge":
                resident.apply(space.decode(c))
                losses = resident.losses(windows)
            else:
                losses = resident.losses(windows, units={(i, "layer") for i in c["drop"]})
            mem.append(time.perf_counter() - t0)
            mem_losses.append(losses)
    finally:
        resident.close()
    disk, diff = [], 0.0
    with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp:
        for k, c in enumerate(candidates):
            t0 = time.perf_counter()
            losses = disk_losses(space.decode(c), Path(tmp) / "candidate", windows, 8, args.threads)
            disk.append(time.perf_counter() - t0)
            diff = max(diff, *(abs(losses[d] - mem_losses[k][d]) for d in losses))
    m, d = statistics.median(mem[1:]), statistics.median(disk[1:])
    return {
        "part": part,
        "space": space.describe(),
        "candidates": args.candidates,
        "tokens_per_domain": {dd: sum(len(w) - 1 for w in ws) for dd, ws in windows.items()},
        "resident_s": round(m, 4),
        "disk_s": round(d, 4),
        "speedup": round(d / m, 2) if m > 0 else None,
        "max_loss_difference": diff,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", type=Path, default=default_zoo())
    ap.add_argument("--parts", default="merge,drop", help="merge, drop or both (comma-separated)")
    ap.add_argument("--candidates", type=int, default=6, help="candidates timed per path (after one warm-up)")
    ap.add_argument("--tokens", type=int, default=512, help="search tokens per domain")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--drop", type=int, default=1, help="layers a drop candidate drops")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not (args.zoo / "manifest.json").exists():
        print(f"no zoo at {args.zoo}: build one (splice zoo build tiny) or set SPLICE_TEST_ZOO", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    before = load_avg()
    rows = [bench(p.strip(), args) for p in args.parts.split(",") if p.strip()]
    result = {"zoo": str(args.zoo), "threads": args.threads, "load_avg_before": before, "load_avg_after": load_avg(), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"zoo {args.zoo}, {args.threads} torch thread(s), load average {before} -> {result['load_avg_after']}")
    print("| space | candidates | resident s/eval | merge-to-disk + reload s/eval | speed-up | max loss difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['space']} | {r['candidates']} | {r['resident_s']:.3f} | {r['disk_s']:.3f} | {r['speedup']}x | {r['max_loss_difference']:.1e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
