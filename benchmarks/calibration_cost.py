"""What a calibration pass costs: time against one plain forward over the same tokens, peak memory, size on disk.

Each measurement runs in its own process (peak RSS is the process's own), on the same windows
(``--tokens`` tokens of ``--text`` drawn as ``splice calibrate`` draws them, seed 0):

- ``forward``: the model loaded as ``splice calibrate`` loads it, one inference-mode forward per batch;
- ``calibrate``: ``splice.calibrate`` (Grams of every Linear's inputs, embedding token counts);
- ``fisher``: ``splice.calibrate(fisher=True)`` (also one backward per window);
- ``merge``: ``splice merge`` of a ``regmean`` recipe over ``--experts`` with the statistics just measured
  (each expert calibrated on the same text), to show the merge's peak memory.

A model folder without a tokenizer (``benchmarks/make_checkpoints.py`` writes none) is viewed
through a temporary folder that links its files and those of ``--tokenizer``.

    OMP_NUM_THREADS=2 python benchmarks/calibration_cost.py --model benchmarks/.work/llama-150M/base \\
        --experts benchmarks/.work/llama-150M/ft1,benchmarks/.work/llama-150M/ft2 \\
        --tokenizer $SPLICE_TEST_ZOO/tokenizer --text $SPLICE_TEST_ZOO/data/code/train.jsonl --tokens 16384
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("forward", "calibrate", "fisher", "merge")


def view(model: Path, tokenizer: Path | None, root: Path) -> Path:
    """``model`` itself if it has a tokenizer, else a folder linking its files and the tokenizer's."""
    if tokenizer is None or any((model / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        return model
    out = root / model.name
    out.mkdir(parents=True, exist_ok=True)
    import shutil

    for src in [*model.iterdir(), *(p for p in tokenizer.iterdir() if p.name.startswith(("tokenizer", "special_tokens")))]:
        dst = out / src.name
        if dst.exists():
            continue
        if src.suffix == ".safetensors":
            dst.symlink_to(src.resolve())  # weights are read in place
        else:
            shutil.copy(src, dst)  # side files are copied into a merge's output, which refuses links out of the folder
    return out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: kB


def child(mode: str, args: argparse.Namespace) -> dict:
    import torch

    import splice

    out: dict = {"mode": mode}
    t0 = time.perf_counter()
    if mode == "forward":
        from splice.calibration.collect import batches_of
        from splice.calibration.text import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, read_documents, sample_windows
        from splice.eval.perplexity import adds_bos
        from splice.hf import load_causal_lm

        lm, tok = load_causal_lm(args.model, with_tokenizer=True)
        out["load_s"] = time.perf_counter() - t0
        wins = sample_windows(
            tok, read_documents(args.text), tokens=args.tokens, seq_len=DEFAULT_SEQ_LEN, seed=0, bos=adds_bos(tok), source=str(args.text)
        )
        t1 = time.perf_counter()
        with torch.inference_mode():
            for b in batches_of(wins, DEFAULT_BATCH_SIZE):
                lm(input_ids=torch.tensor(b, dtype=torch.long), use_cache=False)
        out["pass_s"] = time.perf_counter() - t1
    elif mode in ("calibrate", "fisher"):
        s = splice.calibrate(args.model, args.text, args.stats, tokens=args.tokens, seed=0, fisher=mode == "fisher", quiet=True, force=True)
        out["stats_bytes"] = Path(s["out"]).stat().st_size
        out["grams"] = s["grams"]
    elif mode == "merge":
        recipe = {
            "merge_method": "regmean",
            "models": [{"model": m} for m in args.merge_models],
            "calibration": dict(zip(args.merge_models, args.merge_stats)),
        }
        p = Path(args.stats).with_suffix(".yaml")
        p.write_text(json.dumps(recipe))
        splice.merge(p, args.merge_out, quiet=True, force=True)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def run_child(mode: str, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="the model calibrated (and the merge's first model)")
    ap.add_argument("--experts", default="", help="comma-separated models merged with --model by regmean (default: no merge)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer folder for models that have none")
    ap.add_argument("--text", required=True, type=Path, help="calibration text")
    ap.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"which measurements (default {','.join(MODES)})")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    ap.add_argument("--merge-models", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--merge-stats", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--merge-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="splice-calib-cost-"))
    model = view(args.model.resolve(), args.tokenizer, work / "views")
    experts = [view(Path(e).resolve(), args.tokenizer, work / "views") for e in args.experts.split(",") if e.strip()]
    common = ["--model", str(model), "--text", str(args.text), "--tokens", str(args.tokens)]
    modes = [m for m in args.modes.split(",") if m]
    res: dict[str, dict] = {}
    for mode in modes:
        if mode == "merge":
            continue
        res[mode] = run_child(mode, [*common, "--stats", str(work / f"{mode}.stats.safetensors")])
        print(json.dumps(res[mode]), file=sys.stderr)
    if "merge" in modes and experts:
        stats = [str(work / "calibrate.stats.safetensors")]
        for i, e in enumerate(experts):
            s = work / f"expert{i}.stats.safetensors"
            run_child("calibrate", ["--model", str(e), "--text", str(args.text), "--tokens", str(args.tokens), "--stats", str(s)])
            stats.append(str(s))
        res["merge"] = run_child(
            "merge",
            [
                *common,
                "--stats",
                str(work / "merge.stats.safetensors"),
                "--merge-models",
                str(model),
                *map(str, experts),
                "--merge-stats",
                *stats,
                "--merge-out",
                str(work / "merged"),
            ],
        )
    command = "python benchmarks/calibration_cost.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    threads = os.environ.get("OMP_NUM_THREADS", "torch default")
    print(f"`OMP_NUM_THREADS={threads} {command}`\n")
    print(f"{args.tokens} tokens of {args.text.name}; model {args.model}\n")
    print("| measurement | seconds (load + pass) | pass only | x plain forward | peak RSS GB | statistics on disk |")
    print("|---|---:|---:|---:|---:|---:|")
    fwd = res.get("forward")
    load_s = fwd["load_s"] if fwd else None
    for mode, r in res.items():
        pass_s = r.get("pass_s", r["seconds"] - load_s if load_s is not None and mode != "merge" else None)
        ratio = f"{pass_s / fwd['pass_s']:.2f}" if fwd and pass_s is not None and mode != "merge" else ""
        size = f"{r['stats_bytes'] / 2**20:.0f} MB" if "stats_bytes" in r else ""
        shown = "" if pass_s is None else f"{pass_s:.1f}"
        print(f"| {mode} | {r['seconds']:.1f} | {shown} | {ratio} | {r['peak_rss_gb']:.2f} | {size} |")
    if args.out:
        args.out.write_text(json.dumps({"command": command, "threads": threads, "tokens": args.tokens, "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
