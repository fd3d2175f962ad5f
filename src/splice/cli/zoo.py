"""Subcommands ``zoo``, ``eval`` and ``demo``: parse, call the library, print.

torch and transformers are imported inside the command functions only, so
``splice --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from .. import options
from .common import POSITIVE_INT, SEQ_LEN, add_common, add_force, add_output, add_seed, add_threads, checked, named


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
    b.add_argument(
        "--out",
        type=checked(options.output_folder),
        default=None,
        help="zoo folder: new, empty, or a zoo to finish (default: the splice cache, ~/.cache/splice/zoo/TIER)",
    )
    add_seed(b)
    add_threads(b)
    add_common(b)
    b.set_defaults(func=cmd_zoo_build)
    i = zsub.add_parser("info", help="show a built zoo's domains and models")
    i.add_argument("dir", nargs="?", type=checked(options.existing_folder), default=None, help="zoo folder (default: the cache's)")
    i.add_argument("--tier", choices=["tiny", "smol"], default="tiny")
    i.add_argument("--json", action="store_true", help="print the manifest")
    add_common(i)
    i.set_defaults(func=cmd_zoo_info)
    p.set_defaults(func=lambda a: (p.print_help(), 0)[1])


# -- eval ----------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval import check_results_file, evaluate, format_table, resolve_inputs, run_lm_eval, write_json

    if args.json:
        check_results_file(args.json, args.force, name="json")  # refuse before minutes of evaluation
    which = dict(zoo=args.zoo, base=args.base, experts=dict(args.experts or []), general=args.general)
    if args.lm_eval:
        models = resolve_inputs(args.models, **which)["models"]
        out = {m: run_lm_eval(m, args.lm_eval.split(","), batch_size=args.batch_size, limit=args.limit) for m in models}
        print(json.dumps(out, indent=2))
        if args.json:
            write_json(out, args.json, force=args.force)
        return 0
    res = evaluate(
        args.models,
        dict(args.domains or []),
        dict(args.tasks or []),
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        quiet=args.quiet,
        **which,
    )
    print(format_table(res))
    if args.json:
        write_json(res, args.json, force=args.force)
        print(f"wrote {args.json}")
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="per-domain loss, perplexity and bits/byte; multiple-choice accuracy; normalized scores")
    p.add_argument("models", nargs="*", metavar="MODEL", help="model folders, .gguf files, or cached HF ids")
    p.add_argument(
        "--domain",
        dest="domains",
        action="append",
        type=named(options.text_file),
        metavar="NAME=FILE",
        help='text (.txt) or JSONL with "text" (repeatable)',
    )
    p.add_argument(
        "--task",
        dest="tasks",
        action="append",
        type=named(options.text_file),
        metavar="NAME=FILE",
        help='multiple-choice JSONL {"context", "choices", "label"} (repeatable)',
    )
    p.add_argument(
        "--zoo", type=checked(options.existing_folder), metavar="DIR", help="use a built zoo's held-out domains, task, base and experts"
    )
    p.add_argument("--base", metavar="MODEL", help="base model: report normalized scores against it")
    p.add_argument(
        "--expert",
        dest="experts",
        action="append",
        type=named(value="MODEL"),
        metavar="DOMAIN=MODEL",
        help="the expert tuned on DOMAIN (repeatable)",
    )
    p.add_argument("--general", metavar="DOMAIN", help="domain no expert was tuned on: report forgetting on it")
    p.add_argument("--tokens", dest="max_tokens", type=POSITIVE_INT, default=None, metavar="N", help="evaluate at most N tokens per domain")
    p.add_argument(
        "--seq-len", type=SEQ_LEN, default=256, help="window length in tokens, at least 2 (default 256; capped by the model's context)"
    )
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="windows per forward pass (default 8)")
    p.add_argument(
        "--json", type=checked(options.output_file), metavar="FILE", help="write all results as JSON (an existing file needs --force)"
    )
    add_force(p)
    p.add_argument("--lm-eval", metavar="TASKS", help="run lm-evaluation-harness tasks (comma-separated) instead")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="with --lm-eval: items per task")
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
        max_tokens=args.max_tokens,
        chart=not args.no_chart,
        force=args.force,
        parts=args.parts,
        search_budget=args.search_budget,
    )
    if "table" in res:
        print(res["table"])
        print()
    written = ["leaderboard"] * ("table" in res) + [n for n in ("search", "moe", "skip") if n in res] + ["summary"]
    charts = [c for c in (res.get("chart"), *((res.get(n) or {}).get("chart") for n in ("search", "moe", "skip"))) if c]
    missing = "" if charts or args.no_chart else " (no charts: matplotlib is not installed)"
    print("wrote " + ", ".join([f"{args.out}/{n}.json" for n in written] + charts) + missing)
    for label, err in res["skipped"].items():
        print(f"skipped {label}: {err}", file=sys.stderr)
    if "table" in res:
        print(res["summary"])
    for line in res["closing"]["lines"]:
        print(line)
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="merge the zoo's experts with every method, search for a better recipe, build a MoE of them, skip layers of the base; "
        "say which to use for what",
    )
    p.add_argument("--zoo", choices=["tiny", "smol"], default="tiny", help="which zoo tier (built if absent)")
    p.add_argument(
        "--zoo-dir", type=checked(options.output_folder), default=None, help="zoo folder, built there if absent (default: the splice cache)"
    )
    add_output(p, required=False, default="demo-out", what="where models, the JSON reports and the charts go")
    p.add_argument("--parts", default=None, help="comma-separated subset of merge,search,moe,skip (default: all four)")
    p.add_argument(
        "--search-budget", type=POSITIVE_INT, default=None, metavar="N", help="trials of the search part's study (default: per tier)"
    )
    p.add_argument("--methods", default=None, help="comma-separated subset of merge methods")
    p.add_argument("--tokens", dest="max_tokens", type=POSITIVE_INT, default=None, help="evaluation tokens per domain (default: per tier)")
    add_seed(p)
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    add_common(p)
    p.set_defaults(func=cmd_demo)
