"""Subcommands ``zoo``, ``eval`` and ``demo``: parse, call the library, print.

torch and transformers are imported inside the command functions only, so
``splice --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_common


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    from ..errors import SpliceError

    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise SpliceError(f"{flag} {v!r}: expected NAME=FILE")
        out[name] = path
    return out


# -- zoo -----------------------------------------------------------------
def cmd_zoo_build(args: argparse.Namespace) -> int:
    from ..zoo import build_zoo, default_zoo_dir

    out = args.out or str(default_zoo_dir(args.tier))
    m = build_zoo(args.tier, out, seed=args.seed, quiet=args.quiet, threads=args.threads)
    print(
        f"zoo '{args.tier}' in {out}: base + experts {', '.join(m['experts'])}; "
        f"domains {', '.join(m['domains'])}; {m['last_run_seconds']['total']:.1f} s this run"
    )
    return 0


def cmd_zoo_info(args: argparse.Namespace) -> int:
    from ..zoo import default_zoo_dir, load_manifest

    out = args.dir or str(default_zoo_dir(args.tier))
    m = load_manifest(out)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"zoo '{m['tier']}' in {out} (seed {m['seed']})")
    for d, v in m["domains"].items():
        print(
            f"  domain {d:12s} train {v['train_docs']:5d} docs {v['train_chars']:>9,d} chars | held-out "
            f"{v['heldout_docs']:4d} docs {v['heldout_chars']:>7,d} chars | {v['licence']}"
        )
    for n, v in m["models"].items():
        print(f"  model  {n:12s} {out}/{v['path']}")
    return 0


def add_zoo(sub) -> None:
    p = sub.add_parser("zoo", help="build the model zoo: real corpora, a base model and domain experts")
    zsub = p.add_subparsers(dest="zoo_command", metavar="ACTION")
    b = zsub.add_parser("build", help="build (or finish building) a zoo tier; cached and resumable")
    b.add_argument(
        "--tier",
        choices=["tiny", "smol"],
        default="tiny",
        help="tiny: ~1M-param Llama trained here (minutes); smol: SmolLM2-135M from its packaged GGUF",
    )
    b.add_argument("--out", default=None, help="output folder (default: the splice cache, ~/.cache/splice/zoo/TIER)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_common(b)
    b.set_defaults(func=cmd_zoo_build)
    i = zsub.add_parser("info", help="show a built zoo's domains and models")
    i.add_argument("dir", nargs="?", default=None)
    i.add_argument("--tier", choices=["tiny", "smol"], default="tiny")
    i.add_argument("--json", action="store_true", help="print the manifest")
    add_common(i)
    i.set_defaults(func=cmd_zoo_info)
    p.set_defaults(func=lambda a: (p.print_help(), 0)[1])


# -- eval ----------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from ..errors import SpliceError
    from ..eval import evaluate, format_table, run_lm_eval, write_json

    domains = _pairs(args.domain, "--domain")
    tasks = _pairs(args.task, "--task")
    experts = _pairs(args.expert, "--expert")
    models = list(args.models)
    if args.zoo:
        from ..zoo import zoo_paths

        zp = zoo_paths(args.zoo)
        domains = {**{d: str(p) for d, p in zp["heldout"].items()}, **domains}
        tasks = {**{t: str(p) for t, p in zp["tasks"].items()}, **tasks}
        if args.base is None:
            args.base = str(zp["models"]["base"])
            experts = {**{d: str(zp["models"][d]) for d in zp["manifest"]["experts"]}, **experts}
            args.general = args.general or zp["manifest"]["general_domain"]
        for ref in [args.base, *experts.values()]:
            if ref not in models:
                models.append(ref)
    if not models:
        raise SpliceError("splice eval: name at least one MODEL")
    if args.lm_eval:
        out = {m: run_lm_eval(m, args.lm_eval.split(","), batch_size=args.batch_size, limit=args.limit) for m in models}
        print(json.dumps(out, indent=2))
        if args.json:
            write_json(out, args.json)
        return 0
    if not domains and not tasks:
        raise SpliceError("splice eval: give at least one --domain NAME=FILE or --task NAME=FILE (or --zoo DIR)")
    if args.base is not None and args.base not in models:
        models.insert(0, args.base)
    res = evaluate(
        models,
        domains,
        tasks,
        max_tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        quiet=args.quiet,
        base=args.base,
        experts=experts or None,
        general=args.general,
    )
    print(format_table(res))
    if args.json:
        write_json(res, args.json)
        print(f"wrote {args.json}")
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="per-domain loss, perplexity and bits/byte; multiple-choice accuracy; normalized scores")
    p.add_argument("models", nargs="*", metavar="MODEL", help="model folders, .gguf files, or cached HF ids")
    p.add_argument("--domain", action="append", metavar="NAME=FILE", help='text (.txt) or JSONL with "text" (repeatable)')
    p.add_argument(
        "--task", action="append", metavar="NAME=FILE", help='multiple-choice JSONL {"context", "choices", "label"} (repeatable)'
    )
    p.add_argument("--zoo", metavar="DIR", help="use a built zoo's held-out domains, task, base and experts")
    p.add_argument("--base", metavar="MODEL", help="base model: report normalized scores against it")
    p.add_argument("--expert", action="append", metavar="DOMAIN=MODEL", help="the expert tuned on DOMAIN (repeatable)")
    p.add_argument("--general", metavar="DOMAIN", help="domain no expert was tuned on: report forgetting on it")
    p.add_argument("--tokens", type=int, default=None, metavar="N", help="evaluate at most N tokens per domain")
    p.add_argument("--seq-len", type=int, default=256, help="window length in tokens (capped by the model's context)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", metavar="OUT", help="write all results as JSON")
    p.add_argument("--lm-eval", metavar="TASKS", help="run lm-evaluation-harness tasks (comma-separated) instead")
    p.add_argument("--limit", type=int, default=None, help="with --lm-eval: items per task")
    add_common(p)
    p.set_defaults(func=cmd_eval)


# -- demo ----------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from ..zoo.demo import run_demo

    res = run_demo(
        args.zoo,
        args.out,
        zoo_dir=args.zoo_dir,
        seed=args.seed,
        quiet=args.quiet,
        methods=args.methods.split(",") if args.methods else None,
        max_tokens=args.tokens,
        chart=not args.no_chart,
    )
    print(res["table"])
    print()
    print(
        f"wrote {args.out}/leaderboard.json" + (f" and {res['chart']}" if res.get("chart") else " (no chart: matplotlib is not installed)")
    )
    for label, err in res["skipped"].items():
        print(f"skipped {label}: {err}", file=sys.stderr)
    print(res["summary"])
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="merge the zoo's experts with every method, evaluate, and name the winner")
    p.add_argument("--zoo", choices=["tiny", "smol"], default="tiny", help="which zoo tier (built if absent)")
    p.add_argument("--zoo-dir", default=None, help="zoo folder (default: the splice cache)")
    p.add_argument("--out", default="demo-out", help="where merges, leaderboard.json and leaderboard.png go")
    p.add_argument("--methods", default=None, help="comma-separated subset of merge methods")
    p.add_argument("--tokens", type=int, default=None, help="evaluation tokens per domain (default: per tier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    add_common(p)
    p.set_defaults(func=cmd_demo)
