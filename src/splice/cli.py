"""The command line: parse arguments, call the library, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import __version__


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")


def cmd_merge(args: argparse.Namespace) -> int:
    from .engine import MergeOptions, run_merge

    opts = MergeOptions(
        force=args.force,
        seed=args.seed,
        device=args.device,
        shard_size=args.shard_size,
        allow_pickle=args.allow_pickle,
        quiet=args.quiet,
        workers=args.workers,
        threads=args.threads,
        tune_malloc=True,  # the CLI owns its process; a library call leaves the allocator alone
    )
    s = run_merge(args.recipe, args.out, opts)
    print(f"wrote {s['out']}: {s['method']}, {s['layers']} layers, {s['tensors']} tensors, {_size(s['bytes'])} in {s['seconds']:.1f}s")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .engine import plan_recipe

    plan, sources = plan_recipe(args.recipe, allow_pickle=args.allow_pickle)
    print(f"method {plan.method.name}; {len(plan.layer_sources)} output layers from source layers {plan.layer_sources}")
    print(f"{len(plan.jobs)} tensors, {_size(plan.total_bytes)}")
    for w in plan.warnings:
        print(f"warning: {w}")
    if args.verbose:
        for j in plan.jobs:
            ins = ", ".join(f"{i.model}:{i.tensor}" for i in j.inputs)
            base = f" base={j.base.model}" if j.base else ""
            print(f"  {j.out_name} {list(j.shape)} {str(j.out_dtype).replace('torch.', '')} <- {ins}{base}")
    for s in sources.values():
        s.close()
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import NO_DEFAULT, all_methods

    if args.markdown:
        print("| method | what it does | base | parameters (per-model / global) | source |")
        print("|---|---|---|---|---|")
        for m in all_methods():
            per = ", ".join(_fmt_param(p, NO_DEFAULT) for p in m.params if p.per_model) or "-"
            glo = ", ".join(_fmt_param(p, NO_DEFAULT) for p in m.params if not p.per_model) or "-"
            print(f"| `{m.name}` | {m.summary} | {m.base} | {per} / {glo} | {m.paper} |")
        return 0
    for m in all_methods():
        params = []
        for p in m.params:
            scope = "per-model" if p.per_model else "global"
            default = "required" if p.default is NO_DEFAULT else f"default {p.default}"
            params.append(f"{p.name} ({scope}, {default})")
        base = {"required": "needs base", "optional": "base optional", "none": "no base"}[m.base]
        rand = ", random (seeded)" if m.randomized else ""
        print(f"{m.name:18s} {m.summary} [{base}{rand}] params: {'; '.join(params) or 'none'}")
    return 0


def _fmt_param(p, no_default) -> str:
    return f"`{p.name}`" if p.default is no_default else f"`{p.name}`={p.default}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splice", description="Compose new language models out of existing checkpoints.")
    parser.add_argument("--version", action="version", version=f"splice {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("merge", help="merge (or stack) models from a mergekit-style YAML recipe")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    p.add_argument("--seed", type=int, default=0, help="seed for random methods (DARE, DELLA); default 0")
    p.add_argument("--device", default="cpu", help="where to compute: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--shard-size", default="5GB", help="maximum shard size, e.g. 5GB (default), 500MB, 2GiB")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt weights (loaded with weights_only=True)")
    p.add_argument("--workers", type=int, default=None, help="tensors processed at once (default: cores, at least 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per operation (default: cores / workers)")
    _add_common(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("plan", help="show what a recipe would do, without running it")
    p.add_argument("recipe")
    p.add_argument("--allow-pickle", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("methods", help="list merge methods, their parameters and defaults")
    p.add_argument("--markdown", action="store_true", help="print the README's methods table")
    _add_common(p)
    p.set_defaults(func=cmd_methods)

    for hook in _extension_parsers():
        hook(sub)
    return parser


EXTENSION_MODULES = ("cli_zoo", "cli_skip", "cli_moe")


def _extension_parsers():
    """Subcommands of the operation packages: every ``add_*_parser(sub)`` in the cli_* modules."""
    import importlib

    hooks = []
    for mod in EXTENSION_MODULES:
        try:
            m = importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.{mod}":
                continue
            raise
        hooks += [getattr(m, n) for n in sorted(dir(m)) if n.startswith("add_") and n.endswith("_parser")]
    return hooks


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from .errors import SpliceError

    from .signals import terminate_as_interrupt

    try:
        with terminate_as_interrupt():
            return int(args.func(args) or 0)
    except SpliceError as e:
        if getattr(args, "verbose", False):
            raise
        print(f"splice: error: {e.cli_message(vars(args))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("splice: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
