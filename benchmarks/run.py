"""Time splice against mergekit 0.1.5 and against the read/write floor, on the same recipe.

    python benchmarks/run.py                                   # 500M, TIES of 3 fine-tunes + base
    python benchmarks/run.py --params 100M --tools floor,splice
    python benchmarks/run.py --tools splice --splice "--workers 1 --threads 2" --splice "--workers 2 --threads 1"
    python benchmarks/run.py --method dare_ties --tools splice,mergekit

Needs the checkpoints (``make_checkpoints.py --params SIZE``; built here if
missing) and, for mergekit, ``benchmarks/.venv-mergekit`` (``setup_mergekit.sh``).

Every measured run is a fresh child process. Wall time is measured around it;
peak RSS is the child's ``ru_maxrss`` from ``wait4`` (what ``/usr/bin/time -v``
calls "Maximum resident set size"), and the child's ``/proc/PID/status`` is
sampled every 20 ms to split that peak into anonymous memory (what the process
allocated) and file-backed memory (memory-mapped input pages, which the kernel
can drop at any time). Inputs are read once before the first run so every run
sees the same warm page cache.

The floor is the least any merge tool has to do: read every input tensor once
(``safetensors.safe_open(...).get_tensor``) and write one output tensor per
name, with the same fsync at the end that splice does. No arithmetic.

Prints a markdown table, writes JSON (``--json``), and compares splice's and
mergekit's outputs tensor by tensor in float32 (deterministic methods only).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import shutil
import struct
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
SPLICE = ROOT / ".venv" / "bin" / "splice"
SPLICE_PY = ROOT / ".venv" / "bin" / "python"
MERGEKIT = HERE / ".venv-mergekit" / "bin" / "mergekit-yaml"

# method: (fine-tunes used, base model in the recipe, per-model parameters, global parameters).
# The TIES-style family: three fine-tunes plus base, weight 1, density 0.5 where it applies,
# normalize (the issue-11 table's recipe); every other method with mergekit's usual inputs.
_TIES_STYLE = (3, True, {"weight": 1.0, "density": 0.5}, {"normalize": True})
RECIPES: dict[str, tuple[int, bool, dict, dict]] = {
    "ties": _TIES_STYLE,
    "dare_ties": _TIES_STYLE,
    "dare_linear": _TIES_STYLE,
    "breadcrumbs": _TIES_STYLE,
    "breadcrumbs_ties": _TIES_STYLE,
    "della": _TIES_STYLE,
    "della_linear": _TIES_STYLE,
    "task_arithmetic": (3, True, {"weight": 0.5}, {}),
    "linear": (3, False, {"weight": 1.0}, {}),  # the base is merged as one more model
    "sce": (3, True, {}, {"select_topk": 0.5}),
    "pcb": (3, True, {"weight": 1.0, "density": 0.5}, {}),  # not in mergekit: splice (and floor) only
    "model_stock": (3, True, {}, {}),
    "slerp": (1, True, {}, {"t": 0.5}),
    "nuslerp": (2, True, {"weight": 0.5}, {}),
    "multislerp": (3, False, {"weight": 1.0}, {}),
    "karcher": (3, False, {}, {}),
    "nearswap": (1, True, {}, {"t": 0.001}),
    "arcee_fusion": (1, True, {}, {}),
    "ram": (3, True, {}, {"epsilon": 1e-3}),
    "ramplus_tl": (3, True, {}, {"epsilon": 1e-3}),
}
MODELS_USED = {m: r[0] for m, r in RECIPES.items()}
NOT_IN_MERGEKIT = {"pcb"}
# randomized ones (DARE, DELLA; arcee_fusion samples its quantiles above a million elements) only match in distribution
DETERMINISTIC = set(RECIPES) - {"dare_ties", "dare_linear", "della", "della_linear", "arcee_fusion"}


# ------------------------------------------------------------------ recipes


def recipe(method: str, root: Path, dtype: str) -> dict:
    """The benchmark recipe for ``method`` over the checkpoints in ``root`` (mergekit YAML keys)."""
    if method not in RECIPES:
        raise SystemExit(f"run.py: no benchmark recipe for method {method!r}")
    count, uses_base, per_model, glob = RECIPES[method]
    base = str(root / "base")
    fts = [str(root / f"ft{k + 1}") for k in range(count)]
    r: dict = {"merge_method": method}
    if uses_base:
        r["base_model"] = base
        r["models"] = [{"model": base}] + [{"model": f, **({"parameters": dict(per_model)} if per_model else {})} for f in fts]
    else:
        r["models"] = [{"model": m, **({"parameters": dict(per_model)} if per_model else {})} for m in [base] + fts]
    if glob:
        r["parameters"] = dict(glob)
    if dtype == "bfloat16":
        r["dtype"] = "bfloat16"
    else:  # compute in float32, write bf16 like the inputs
        r["dtype"] = dtype
        r["out_dtype"] = "bfloat16"
    return r


def write_yaml(data: dict, path: Path) -> None:
    try:
        import yaml
    except ImportError:  # JSON is valid YAML too
        path.write_text(json.dumps(data, indent=2) + "\n")
        return
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def read_yaml(path: Path) -> dict:
    try:
        import yaml
    except ImportError:
        return json.loads(path.read_text())
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------ measuring


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return out


def cpu_busy_s() -> float:
    """CPU seconds spent busy on all cores since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait: float, threshold: float = 0.15, window: float = 3.0) -> float:
    """Wait (up to ``max_wait`` s) until the machine's other work uses < ``threshold`` cores; returns that use."""
    t_end = time.monotonic() + max_wait
    while True:
        b0, t0 = cpu_busy_s(), time.monotonic()
        time.sleep(window)
        use = (cpu_busy_s() - b0) / (time.monotonic() - t0)
        if use < threshold or time.monotonic() >= t_end:
            return use
        print(f"  machine busy ({use:.2f} cores used by other processes); waiting", file=sys.stderr)
        time.sleep(10)


def _prioritize(nice: int) -> None:
    """In the child before exec: its own session (so its own scheduler autogroup) at ``nice``.

    With autogroups (Linux's default for desktop-like kernels) CPU time is shared
    between sessions first and a plain nice value only counts inside a session, so
    the child gets a session of its own and that session's nice is set too.
    """
    os.setsid()
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass
    os.setpriority(os.PRIO_PROCESS, 0, nice)


def measure(cmd: list[str], log: Path, env: dict | None = None, interval: float = 0.02, priority: int | None = None) -> dict:
    """Run ``cmd`` as a fresh child; wall time, CPU time, peak RSS (exact) and sampled anon/file split.

    Also the CPU time that *other* processes used meanwhile (machine busy time minus the child's),
    so a run disturbed by other work on the machine shows it.
    """
    busy0 = cpu_busy_s()
    with open(log, "wb") as lf:
        t0 = time.perf_counter()
        pre = (lambda: _prioritize(priority)) if priority is not None else None
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, preexec_fn=pre)
        peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            s = _status_kb(p.pid)
            for k in peak:
                peak[k] = max(peak[k], s.get(k, 0))
            time.sleep(interval)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
    rc = p.returncode
    cpu = ru.ru_utime + ru.ru_stime
    other = max(0.0, cpu_busy_s() - busy0 - cpu)
    return {
        "cmd": cmd,
        "returncode": rc,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 2),
        "other_cpu_s": round(other, 2),  # CPU used by other processes during the run (interference)
        "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
        "peak_anon_mb_sampled": round(peak["RssAnon"] / 1024, 1),
        "peak_file_mb_sampled": round(peak["RssFile"] / 1024, 1),
        "log": str(log),
    }


def warm_cache(root: Path) -> float:
    t0 = time.perf_counter()
    buf = bytearray(1 << 24)
    for f in sorted(root.glob("*/model*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


# ------------------------------------------------------------------ the floor (runs in a child)


def floor_worker(recipe_path: Path, out: Path, fsync: bool) -> None:
    """Read every input tensor of the recipe once and write one output tensor per name. No math."""
    import torch
    from safetensors import safe_open

    t0 = time.perf_counter()
    r = read_yaml(recipe_path)
    models = list(dict.fromkeys(([r["base_model"]] if "base_model" in r else []) + [m["model"] for m in r["models"]]))
    files = [safe_open(str(Path(m) / "model.safetensors"), framework="pt") for m in models]
    names = list(files[0].keys())
    # lay out the output header up front, then append tensors in order
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for n in names:
        sl = files[0].get_slice(n)
        shape = sl.get_shape()
        nbytes = 2
        for s in shape:
            nbytes *= s
        header[n] = {"dtype": sl.get_dtype(), "shape": shape, "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for n in names:
            ts = [fh.get_tensor(n) for fh in files]  # every input tensor read once
            f.write(ts[0].contiguous().view(-1).view(torch.uint8).numpy().data)
            del ts
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    shutil.copyfile(Path(models[0]) / "config.json", out / "config.json")
    # the I/O alone, without interpreter start-up and imports, for the report
    print(json.dumps({"floor_io_s": round(time.perf_counter() - t0, 3)}))


# ------------------------------------------------------------------ parity


@functools.lru_cache(maxsize=16)
def _st_index(d: Path) -> dict[str, Path]:
    from safetensors import safe_open

    m = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                m[k] = f
    return m


def _load(index: dict[str, Path], name: str):
    from safetensors import safe_open

    with safe_open(str(index[name]), framework="pt") as h:
        return h.get_tensor(name)


def _threshold_ties(rec: dict, name: str):
    """For TIES: the elements where some model's |delta| equals its trim threshold (exactly).

    Which of several equal magnitudes survive the trim is a tie-break: mergekit takes an
    unstable argsort's order, splice the lowest flat index. Differences there are not errors.
    """
    import torch

    base_i = _st_index(Path(rec["base_model"]))
    b = _load(base_i, name).float()
    tied = torch.zeros(b.shape, dtype=torch.bool)
    for m in rec["models"]:
        if m["model"] == rec["base_model"]:
            continue
        dens = float((m.get("parameters") or {}).get("density", 1.0))
        d = (_load(_st_index(Path(m["model"])), name).float() - b).abs_()
        if dens >= 1.0 or d.numel() == 0:
            continue
        k = max(1, int(dens * d.numel()))
        thr = torch.kthvalue(d.reshape(-1), d.numel() - k + 1).values
        if float(thr) > 0:
            tied |= d == thr
    return tied


def compare(ours: Path, theirs: Path, rec: dict | None = None) -> dict:
    """Per-tensor max |ours - theirs| in float32, relative RMS difference, elements differing.

    With ``rec`` (a TIES recipe), also how many differing elements sit on a trim-threshold tie.
    """

    a, b = _st_index(ours), _st_index(theirs)
    rows = {}
    worst = ("", 0.0)
    identical = 0
    total_el = diff_el = tie_el = 0
    worst_rel = 0.0
    for k in sorted(set(a) & set(b)):
        x, y = _load(a, k), _load(b, k)
        if x.shape != y.shape:
            rows[k] = {"shape_mismatch": [list(x.shape), list(y.shape)]}
            continue
        xf, yf = x.float(), y.float()
        d = (xf - yf).abs_()
        m = float(d.max()) if d.numel() else 0.0
        diff = d > 0
        nd = int(diff.sum())
        rms_y = float(yf.pow(2).mean().sqrt()) if d.numel() else 0.0
        rel = float(d.pow(2).mean().sqrt()) / rms_y if rms_y > 0 else 0.0
        row = {"max_abs": m, "frac_diff": nd / max(1, d.numel()), "rel_rms_diff": rel}
        if rec is not None and nd:
            nt = int((diff & _threshold_ties(rec, k)).sum())
            row["diff_on_threshold_ties"] = nt
            tie_el += nt
        rows[k] = row
        identical += nd == 0
        total_el += d.numel()
        diff_el += nd
        worst_rel = max(worst_rel, rel)
        if m > worst[1]:
            worst = (k, m)
    return {
        "tensors_compared": len(rows),
        "bit_identical_tensors": identical,
        "elements_differing": diff_el,
        "elements_total": total_el,
        "differing_on_threshold_ties": tie_el if rec is not None else None,
        "max_abs": worst[1],
        "worst_tensor": worst[0],
        "max_rel_rms_diff": worst_rel,
        "only_in_splice": sorted(set(a) - set(b)),
        "only_in_mergekit": sorted(set(b) - set(a)),
        "per_tensor": rows,
    }


def file_digest(d: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ provenance


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def splice_state(rev: str | None) -> dict:
    """Which splice was measured: a commit, or the working tree (and which src files differ from HEAD)."""
    import hashlib

    if rev:
        return {"commit": _git("rev-parse", rev), "source": f"git archive {rev}"}
    dirty = [l[3:] for l in _git("status", "--porcelain", "--", "src").splitlines()]
    diff = _git("diff", "HEAD", "--", "src")
    return {
        "commit": _git("rev-parse", "HEAD"),
        "source": "working tree",
        "dirty_src_files": dirty,
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
    }


def mergekit_version() -> str:
    py = MERGEKIT.parent / "python"
    r = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"], capture_output=True, text=True
    )
    return r.stdout.strip()


def export_rev(rev: str) -> Path:
    """splice's ``src/`` at ``rev``, unpacked under .work (run with PYTHONPATH, no install)."""
    commit = _git("rev-parse", rev)
    if not commit:
        raise SystemExit(f"run.py: unknown git revision {rev!r}")
    dest = WORK / f"splice-{commit[:12]}"
    if not (dest / "src" / "splice").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


# ------------------------------------------------------------------ main


def gb(mb: float) -> str:
    return f"{mb / 1024:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="500M", help="checkpoint size preset from make_checkpoints.py (default 500M)")
    ap.add_argument("--method", default="ties", choices=sorted(MODELS_USED))
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="recipe dtype: bfloat16 (default), or float32 = compute in float32 and write out_dtype bfloat16",
    )
    ap.add_argument("--tools", default="floor,splice,mergekit", help="comma list of floor, splice, mergekit")
    ap.add_argument(
        "--splice",
        action="append",
        metavar="ARGS",
        help='extra splice merge arguments, one splice run per use, e.g. "--workers 1 --threads 2" (default: one run, no extra arguments)',
    )
    ap.add_argument(
        "--splice-rev",
        metavar="REV",
        help="measure splice as committed at this git revision (its src/ unpacked under .work) instead of the working tree",
    )
    ap.add_argument(
        "--mergekit-args",
        default="--no-copy-tokenizer",
        help="mergekit-yaml arguments besides recipe and output (default: --no-copy-tokenizer: the checkpoints have no tokenizer; everything else is mergekit's default)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs of each command (the table shows the fastest)")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=120,
        help="before each run wait up to this many seconds for other processes to go quiet (default 120; 0: don't wait)",
    )
    ap.add_argument(
        "--priority",
        type=int,
        default=-15 if os.geteuid() == 0 else None,
        help="scheduling priority (nice value) of the measured runs; default -15 when root, so other "
        "work on a shared machine disturbs the timings less (the same for every tool)",
    )
    ap.add_argument("--no-fsync", action="store_true", help="floor without the final fsync")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs under benchmarks/.work/out-*")
    ap.add_argument("--json", type=Path, help="write the results here (default benchmarks/results/<params>-<method>-<dtype>.json)")
    ap.add_argument("--floor-worker", nargs=2, metavar=("RECIPE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--fsync", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.floor_worker:
        floor_worker(Path(a.floor_worker[0]), Path(a.floor_worker[1]), a.fsync)
        return 0

    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    for t in tools:
        if t not in ("floor", "splice", "mergekit"):
            ap.error(f"unknown tool {t!r}")
    root = WORK / f"llama-{a.params}"
    if not (root / "BUILD.json").exists():
        subprocess.run([sys.executable, str(HERE / "make_checkpoints.py"), "--params", a.params], check=True)
    build = json.loads((root / "BUILD.json").read_text())
    if "mergekit" in tools and a.method in NOT_IN_MERGEKIT:
        print(f"run.py: mergekit 0.1.5 has no {a.method}; timing the other tools", file=sys.stderr)
        tools = [t for t in tools if t != "mergekit"]
    if "mergekit" in tools and not MERGEKIT.exists():
        raise SystemExit(f"run.py: {MERGEKIT} missing; run: bash benchmarks/setup_mergekit.sh")

    tag = f"{a.params}-{a.method}-{a.dtype}"
    rdir = WORK / "runs" / tag
    rdir.mkdir(parents=True, exist_ok=True)
    rpath = rdir / "recipe.yaml"
    write_yaml(recipe(a.method, root, a.dtype), rpath)
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)

    runs: list[tuple[str, list[str]]] = []
    if "floor" in tools:
        cmd = [str(SPLICE_PY), str(HERE / "run.py"), "--floor-worker", str(rpath), "{out}"] + ([] if a.no_fsync else ["--fsync"])
        runs.append(("floor", cmd))
    if "splice" in tools:
        if a.splice_rev:
            env["PYTHONPATH"] = str(export_rev(a.splice_rev))
            splice_cmd = [str(SPLICE_PY), "-m", "splice"]
        else:
            splice_cmd = [str(SPLICE)]
        for extra in a.splice or [""]:
            label = "splice" + (f" {extra}" if extra else "")
            runs.append((label, splice_cmd + ["merge", str(rpath), "-o", "{out}", "--force", "-q"] + shlex.split(extra)))
    if "mergekit" in tools:
        runs.append(("mergekit", [str(MERGEKIT), str(rpath), "{out}"] + shlex.split(a.mergekit_args)))

    what = f"base + {MODELS_USED[a.method]} fine-tune(s)"
    print(
        f"# {a.params} Llama ({build['params'] / 1e6:.0f}M parameters, bf16), {a.method} of {what}, recipe dtype {a.dtype}", file=sys.stderr
    )
    warm = warm_cache(root)
    print(f"warmed page cache in {warm:.1f} s", file=sys.stderr)
    if "splice" in tools:
        # splice compiles its numba kernels once per install (cached on disk); a user pays that
        # on the first merge only, so compile them here, untimed, on the same recipe
        t0 = time.time()
        subprocess.run(
            splice_cmd + ["merge", str(rpath), "-o", str(WORK / f"out-{tag}-warmup"), "--force", "-q"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        shutil.rmtree(WORK / f"out-{tag}-warmup", ignore_errors=True)
        print(f"splice warm-up run (kernel compile) in {time.time() - t0:.1f} s", file=sys.stderr)

    results = []
    outs: dict[str, Path] = {}
    for label, cmd in runs:
        best = None
        for rep in range(a.repeat):
            slug = label.replace(" ", "").replace("-", "_")
            out = WORK / f"out-{tag}-{slug}"
            shutil.rmtree(out, ignore_errors=True)
            cmd_r = [c.replace("{out}", str(out)) for c in cmd]
            before = wait_quiet(a.quiet_wait) if a.quiet_wait > 0 else None
            r = measure(cmd_r, rdir / f"{slug}-{rep}.log", env, priority=a.priority)
            r["label"] = label
            r["other_cores_before"] = None if before is None else round(before, 2)
            if label == "floor" and r["returncode"] == 0:
                for line in Path(r["log"]).read_text().splitlines():
                    if line.startswith("{") and "floor_io_s" in line:
                        r.update(json.loads(line))
            status = "ok" if r["returncode"] == 0 else f"FAILED (exit {r['returncode']}, see {r['log']})"
            print(
                f"{label:40s} {r['wall_s']:8.1f} s  peak RSS {gb(r['peak_rss_mb'])} GB "
                f"(anon {gb(r['peak_anon_mb_sampled'])}, file {gb(r['peak_file_mb_sampled'])})  cpu {r['cpu_s']:.0f} s  "
                f"others {r['other_cpu_s']:.0f} cpu-s  {status}",
                file=sys.stderr,
            )
            if r["returncode"] != 0:
                best = r
                break
            r.setdefault("all_wall_s", [])
            if best is None or r["wall_s"] < best["wall_s"]:
                prev = best["all_wall_s"] if best else []
                best = r
                best["all_wall_s"] = prev
            best["all_wall_s"].append(r["wall_s"])
            outs[label] = out
        results.append(best)

    # determinism: every splice run must write the same bytes
    digests = {}
    for label, out in outs.items():
        if label.startswith("splice") and out.exists():
            digests[label] = file_digest(out)
    parity = None
    spl = next((l for l in outs if l.startswith("splice")), None)
    if not a.no_parity and spl and "mergekit" in outs and outs["mergekit"].exists():
        parity = compare(outs[spl], outs["mergekit"], read_yaml(rpath) if a.method == "ties" else None)
        parity["deterministic_method"] = a.method in DETERMINISTIC

    floor = next((r for r in results if r["label"] == "floor" and r["returncode"] == 0), None)
    mk = next((r for r in results if r["label"] == "mergekit" and r["returncode"] == 0), None)

    lines = [
        "| run | wall s | peak RSS GB | anon GB | file-mapped GB | CPU s | others' CPU s | x floor | mergekit / this |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ok = r["returncode"] == 0
        xf = f"{r['wall_s'] / floor['wall_s']:.1f}" if floor and ok else ""
        vm = f"{mk['wall_s'] / r['wall_s']:.1f}x" if mk and ok else ""
        lines.append(
            f"| {r['label']}{'' if ok else ' (failed)'} | {r['wall_s']:.1f} | {gb(r['peak_rss_mb'])} | {gb(r['peak_anon_mb_sampled'])} | "
            f"{gb(r['peak_file_mb_sampled'])} | {r['cpu_s']:.0f} | {r['other_cpu_s']:.0f} | {xf} | {vm} |"
        )
    print("\n".join(lines))
    if digests:
        same = len(set(digests.values())) == 1
        print(f"\nsplice outputs across {len(digests)} setting(s): {'bit-identical' if same else 'DIFFER'}")
    if parity:
        print(
            f"parity splice vs mergekit ({a.method}, {'deterministic' if parity['deterministic_method'] else 'randomized: not expected to match'}): "
            f"{parity['tensors_compared']} tensors, {parity['bit_identical_tensors']} bit-identical, "
            f"{parity['elements_differing']}/{parity['elements_total']} elements differ"
            + (
                f" ({parity['differing_on_threshold_ties']} of them on a trim-threshold tie)"
                if parity["differing_on_threshold_ties"] is not None
                else ""
            )
            + f", max |diff| {parity['max_abs']:.3g} ({parity['worst_tensor']}), max relative RMS difference {parity['max_rel_rms_diff']:.2e}"
            + (f"; only in splice: {parity['only_in_splice']}" if parity["only_in_splice"] else "")
            + (f"; only in mergekit: {parity['only_in_mergekit']}" if parity["only_in_mergekit"] else "")
        )

    doc = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "splice": splice_state(a.splice_rev) if "splice" in tools else None,
        "mergekit": mergekit_version() if "mergekit" in tools else None,
        "checkpoints": {k: build[k] for k in ("size", "params", "finetunes", "seed", "noise")},
        "method": a.method,
        "dtype": a.dtype,
        "recipe": read_yaml(rpath),
        "warm_cache_s": round(warm, 2),
        "floor_fsync": not a.no_fsync,
        "priority": a.priority,
        "results": results,
        "splice_digests": digests,
        "parity": parity,
        "command": "python benchmarks/run.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
    }
    jpath = a.json or HERE / "results" / f"{tag}.json"
    jpath.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {jpath}", file=sys.stderr)
    if not a.keep:
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
