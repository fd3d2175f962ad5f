"""``splice moe`` and ``splice moe-compress``: the command-line skin over ``splice.moe``."""

from __future__ import annotations

import argparse

from .. import options
from .common import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    POSITIVE_REAL,
    TEXT_FILE,
    add_allow_pickle,
    add_common,
    add_output,
    add_seed,
    add_shard_size,
    add_threads,
    checked,
)


def _moe_common(p: argparse.ArgumentParser) -> None:
    add_output(p)
    add_seed(p)
    add_shard_size(p)
    add_threads(p)
    add_common(p)


def cmd_moe(args: argparse.Namespace) -> int:
    from ..moe.build import MoEOptions, build_moe

    opts = MoEOptions(
        force=args.force,
        seed=args.seed,
        calibrate=args.calibrate,
        calibration_tokens=args.calibration_tokens,
        calibration_lr=args.calibration_lr,
        balance=args.balance,
        shard_size=args.shard_size,
        allow_pickle=args.allow_pickle,
        quiet=args.quiet,
        threads=args.threads,
        tune_malloc=True,  # the CLI owns its process; a library call leaves the allocator alone
    )
    s = build_moe(args.recipe, args.out, opts)
    shared = f" + {s['shared_experts']} shared" if s["shared_experts"] else ""
    print(
        f"wrote {s['out']}: {s['family']}, {s['experts']} experts{shared}, top-{s['experts_per_token']}, "
        f"{s['layers']} layers, gates '{s['gate_mode']}', {s['tensors']} tensors in {s['seconds']:.1f}s"
    )
    c = s.get("calibration")
    if c:
        per = ", ".join(f"{a:.0%}" for a in c["per_expert_after"])
        print(
            f"calibrated routers: {c['steps']} steps on {sum(c['tokens_per_expert'])} tokens; held-out routing accuracy "
            f"{c['heldout_routing_accuracy_before']:.1%} -> {c['heldout_routing_accuracy_after']:.1%} (per expert: {per})"
        )
    return 0


def cmd_moe_compress(args: argparse.Namespace) -> int:
    from ..moe.compress import compress_moe

    s = compress_moe(
        args.moe,
        args.out,
        experts=args.experts,
        calibration=args.calibration,
        tokens=args.tokens,
        seed=args.seed,
        force=args.force,
        shard_size=args.shard_size,
        quiet=args.quiet,
        threads=args.threads,
        tune_malloc=True,  # the CLI owns its process; a library call leaves the allocator alone
    )
    print(
        f"wrote {s['out']}: {s['experts_before']} -> {s['experts']} experts per layer, merged on {s['tokens']} calibration tokens in {s['seconds']:.1f}s"
    )
    return 0


def add_moe(sub) -> None:
    p = sub.add_parser(
        "moe",
        help="build a mixture-of-experts model from dense experts (mergekit-moe recipes)",
        description="Dense fine-tunes of one base become the experts of a Mixtral / Qwen2-MoE / Qwen3-MoE model.",
    )
    p.add_argument("recipe", help="MoE recipe YAML (mergekit-moe keys)")
    p.add_argument(
        "--calibrate",
        type=NON_NEGATIVE_INT,
        default=0,
        metavar="STEPS",
        help="then train only the routers for STEPS steps on the experts' own text (calibration_file, else prompts)",
    )
    p.add_argument(
        "--calibration-tokens",
        type=POSITIVE_INT,
        default=2048,
        metavar="N",
        help="tokens of text per expert for --calibrate (default 2048)",
    )
    p.add_argument("--calibration-lr", type=POSITIVE_REAL, default=0.01, help="router learning rate for --calibrate (default 0.01)")
    p.add_argument(
        "--balance", type=checked(options.real, minimum=0), default=0.01, help="load-balancing coefficient for --calibrate (default 0.01)"
    )
    add_allow_pickle(p)
    _moe_common(p)
    p.set_defaults(func=cmd_moe)


def add_moe_compress(sub) -> None:
    p = sub.add_parser(
        "moe-compress",
        help="merge a MoE's experts into fewer (M-SMoE style), using calibration text",
        description="Group experts around the most used ones, align their neurons and merge each group weighted by usage.",
    )
    p.add_argument("moe", help="a Mixtral / Qwen2-MoE / Qwen3-MoE model folder")
    p.add_argument("--experts", type=POSITIVE_INT, required=True, help="experts per layer to keep")
    p.add_argument(
        "--calibration", nargs="+", type=TEXT_FILE, required=True, metavar="FILE", help="text files (.txt, .jsonl) to count expert usage on"
    )
    p.add_argument("--tokens", type=POSITIVE_INT, default=4096, help="calibration tokens to use (default 4096)")
    _moe_common(p)
    p.set_defaults(func=cmd_moe_compress)
