"""``splice merge``, ``splice plan`` and ``splice methods``: parse, call the library, print."""

from __future__ import annotations

import argparse

from .common import add_allow_pickle, add_common, add_device, add_gguf, add_output, add_seed, add_shard_size, add_threads, add_workers


def cmd_merge(args: argparse.Namespace) -> int:
    from ..engine import MergeOptions, run_merge

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
    from ..multi import is_multi_stage, recipe_inputs, run_stages

    if args.gguf is not None:  # refused before any work, like the folder
        from ..checkpoint.gguf_write import check_gguf_output

        inputs = recipe_inputs(args.recipe, args.out, stage=args.stage, intermediate_dir=args.intermediate_dir)
        check_gguf_output(args.gguf, args.force, inputs=[*inputs, args.out])
    if is_multi_stage(args.recipe) or args.stage is not None or args.intermediate_dir is not None:
        s = run_stages(args.recipe, args.out, opts, stage=args.stage, intermediate_dir=args.intermediate_dir)
    else:
        s = run_merge(args.recipe, args.out, opts)
    print(f"wrote {s['out']}: {s['method']}, {s['layers']} layers, {s['tensors']} tensors, {_size(s['bytes'])} in {s['seconds']:.1f}s")
    if args.gguf is not None:
        from ..checkpoint.gguf_write import write_gguf

        f = write_gguf(s["out"], args.gguf, gguf_type=args.gguf_type, force=args.force, inputs=[args.recipe], quiet=args.quiet)
        print(f"wrote {f}: GGUF {args.gguf_type}, {_size(f.stat().st_size)}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from ..engine import plan_recipe

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
    from ..methods import NO_DEFAULT, all_methods

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
            params.append(f"{p.name} ({scope}, {default}{', ' + p.bounds if p.bounds else ''})")
        base = {"required": "needs base", "optional": "base optional", "none": "no base"}[m.base]
        rand = ", random (seeded)" if m.randomized else ""
        print(f"{m.name:18s} {m.summary} [{base}{rand}] params: {'; '.join(params) or 'none'}")
    return 0


def _fmt_param(p, no_default) -> str:
    text = f"`{p.name}`" if p.default is no_default else f"`{p.name}`={p.default}"
    return f"{text} {p.bounds}" if p.bounds else text


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"


def add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge (or stack) models from a mergekit-style YAML recipe")
    p.add_argument("recipe", help="recipe YAML file (several '---' documents: a multi-stage recipe)")
    add_output(p)
    add_gguf(p)
    add_seed(p)
    add_device(p)
    add_shard_size(p)
    add_allow_pickle(p)
    add_workers(p)
    add_threads(p)
    p.add_argument(
        "--stage", default=None, help="multi-stage recipe: the stage to write to -o (default: the unnamed document, else the last)"
    )
    p.add_argument(
        "--intermediate-dir", default=None, help="multi-stage recipe: keep the other stages here (default: a temporary folder beside -o)"
    )
    add_common(p)
    p.set_defaults(func=cmd_merge)


def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="show what a recipe would do, without running it")
    p.add_argument("recipe", help="recipe YAML file")
    add_allow_pickle(p)
    add_common(p)
    p.set_defaults(func=cmd_plan)


def add_methods(sub) -> None:
    p = sub.add_parser("methods", help="list merge methods, their parameters and defaults")
    p.add_argument("--markdown", action="store_true", help="print the README's methods table")
    add_common(p)
    p.set_defaults(func=cmd_methods)
