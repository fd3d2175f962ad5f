"""Peak working memory of each merge method on one large tensor, beyond its inputs.

    python benchmarks/method_memory.py                         # every method, one 4096x4096 bf16 tensor
    python benchmarks/method_memory.py --rows 8192 --cols 4096 --methods ties,della,slerp

Each method runs in a fresh child process, called as the engine calls it: the
stored bfloat16 tensors for a ``native_dtype`` method, float32 copies for the
others, a seeded generator for a random one, the parameters of the benchmark
recipe (``run.py``'s ``RECIPES``).  The child builds its inputs, resets the
kernel's peak-RSS mark (``/proc/self/clear_refs``), runs the method once and
reports the peak RSS above what it held before the call, in MB and in
float32 copies of the tensor: a chunked path stays near 1 (its output) plus a
few chunks; a whole-tensor path holds several tensor-sized buffers.  A first,
unmeasured call on a small tensor compiles the numba kernels beforehand.

Memory only: this is a check that a path is bounded by its chunk size, not a
timing benchmark (it prints no times).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import RECIPES  # noqa: E402

SKIPPED = {"regmean": "needs calibration statistics", "fisher": "needs calibration statistics"}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def child(method: str, rows: int, cols: int) -> dict:
    """Run ``method`` once on a rows x cols tensor of 3 (or the recipe's count of) fine-tunes; peak memory above the inputs."""
    import gc

    import torch

    from splice.methods import get_method

    torch.set_num_threads(1)
    m = get_method(method)
    count, uses_base, per_model, glob = RECIPES.get(method, (3, True, {}, {}))
    if method == "passthrough":
        count, uses_base = 1, False
    n_models = count + (0 if uses_base or m.base == "none" else 1)
    if m.max_models is not None:
        n_models = min(n_models, m.max_models)

    def inputs(r: int, c: int):
        g = torch.Generator().manual_seed(0)
        base = (torch.randn(r, c, generator=g) * 0.02).bfloat16()
        fts = [(base.float() + 0.002 * torch.randn(r, c, generator=g)).bfloat16() for _ in range(n_models)]
        if not m.native_dtype:
            base, fts = base.float(), [t.float() for t in fts]
        return fts, (base if m.base != "none" else None)

    def call(fts, base):
        kw = {**{k: v for k, v in per_model.items() if m.param(k)}, **{k: v for k, v in glob.items() if m.param(k)}}
        if m.randomized:
            kw["generator"] = torch.Generator().manual_seed(1)
        return m(fts, base, **kw)

    call(*inputs(600, 512))  # compile the kernels (and warm torch) on a small tensor first
    fts, base = inputs(rows, cols)
    gc.collect()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out = call(fts, base)
    peak = _status_kb("VmHWM")
    assert out.shape == (rows, cols) and bool(torch.isfinite(out).all())
    f32_mb = rows * cols * 4 / 2**20
    work_mb = (peak - before) / 1024
    return {
        "method": method,
        "models": len(fts),
        "native_dtype": m.native_dtype,
        "work_mb": round(work_mb, 1),
        "f32_tensors": round(work_mb / f32_mb, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--methods", help="comma list (default: every registered method)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.rows, a.cols)))
        return 0
    from splice.methods import all_methods

    names = a.methods.split(",") if a.methods else sorted(m.name for m in all_methods())
    print(f"# peak working memory beyond the inputs, one {a.rows}x{a.cols} tensor ({a.rows * a.cols * 4 / 2**20:.0f} MB as float32)")
    print("| method | models | inputs as stored | working MB | float32 tensors |")
    print("|---|---:|---|---:|---:|")
    rows, failed = [], 0
    for name in names:
        if name in SKIPPED:
            print(f"| {name} | | | skipped: {SKIPPED[name]} | |")
            continue
        cmd = [sys.executable, __file__, "--child", name, "--rows", str(a.rows), "--cols", str(a.cols)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            failed += 1
            print(f"| {name} | | | FAILED: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode} | |")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(
            f"| {name} | {r['models']} | {'yes' if r['native_dtype'] else 'float32 copies'} | {r['work_mb']} | {r['f32_tensors']} |",
            flush=True,
        )
    if a.json:
        a.json.write_text(json.dumps({"rows": a.rows, "cols": a.cols, "methods": rows}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
