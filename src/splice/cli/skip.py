"""``splice skip`` and ``splice generate``: thin argument parsing over :mod:`splice.skip`."""

from __future__ import annotations

import argparse
import json
import sys

from .. import options
from ..skip.strategies import STRATEGIES  # torch-free: building the parser stays light
from .common import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    POSITIVE_REAL,
    SEQ_LEN,
    TEXT_FILE,
    add_common,
    add_output,
    add_seed,
    add_threads,
    checked,
)


def add_skip(sub) -> None:
    strategies = "; ".join(f"{s.name}: {s.summary}" for s in STRATEGIES.values())
    p = sub.add_parser(
        "skip",
        help="drop layers (or MLP blocks) for speed: plan, write a pruned checkpoint, optionally heal it",
        description=f"Strategies -- {strategies}.",
    )
    p.add_argument("model", help="model folder, .safetensors or .gguf file")
    add_output(p, required=False, what="output folder for the pruned model")
    p.add_argument("--strategy", default="balanced", help=f"one of {', '.join(STRATEGIES.names())} (default balanced)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--speedup", type=POSITIVE_REAL, help="target decode speedup (the cost model picks the count)")
    how.add_argument("--drop", type=POSITIVE_INT, help="number of layers to drop (MLP blocks for --strategy ffn)")
    how.add_argument("--ratio", type=checked(options.real, above=0, below=1), help="fraction of the layers (MLP blocks) to drop, e.g. 0.25")
    p.add_argument("--calibration", type=TEXT_FILE, help="text file for data-aware strategies and for --heal")
    p.add_argument("--calibration-tokens", type=POSITIVE_INT, default=4096, help="tokens of calibration text to use (default 4096)")
    p.add_argument("--seq-len", type=SEQ_LEN, default=256, help="calibration sequence length, at least 2 (default 256)")
    p.add_argument("--plan-only", action="store_true", help="print the plan, write nothing")
    p.add_argument("--json", action="store_true", help="print the plan (and result) as JSON")
    p.add_argument(
        "--heal",
        type=NON_NEGATIVE_INT,
        default=0,
        metavar="N",
        help="fine-tune the layers next to the cuts for N steps on the calibration text",
    )
    p.add_argument("--heal-lr", type=POSITIVE_REAL, default=1e-4, help="learning rate for --heal (default 1e-4)")
    p.add_argument("--heal-batch", type=POSITIVE_INT, default=4, help="sequences per healing step (default 4)")
    add_seed(p)
    add_common(p)
    p.set_defaults(func=cmd_skip)


def cmd_skip(args: argparse.Namespace) -> int:
    from ..skip import SkipError, plan, prune

    if not args.plan_only and args.out is None:
        raise SkipError("give -o OUT to write the pruned model, or --plan-only to only print the plan")
    if args.heal and args.plan_only:
        raise SkipError("--heal writes a model; it does not go with --plan-only")
    if args.out is not None and not args.plan_only:
        from ..checkpoint.writer import check_output

        check_output(args.out, force=args.force, inputs=[args.model, args.calibration])  # fail before calibrating
    p = plan(
        args.model,
        args.strategy,
        drop=args.drop,
        ratio=args.ratio,
        speedup=args.speedup,
        calibration=args.calibration,
        calibration_tokens=args.calibration_tokens,
        seq_len=args.seq_len,
        quiet=args.quiet,
    )
    result = None
    if not args.plan_only:
        result = prune(
            p,
            args.out,
            force=args.force,
            quiet=args.quiet,
            heal=args.heal,
            calibration=args.calibration,
            heal_lr=args.heal_lr,
            heal_batch=args.heal_batch,
            seq_len=args.seq_len,
            seed=args.seed,
            calibration_tokens=max(args.calibration_tokens, 16384),
            tune_malloc=True,  # the CLI owns its process; a library call leaves the allocator alone
        )
    if args.json:
        print(json.dumps({"plan": p.to_dict(), "result": result}, indent=2))
        return 0
    print(p.describe())
    if result:
        h = result.get("healed")
        if h:
            print(
                f"healed layers {h['layers']} for {h['steps']} steps: held-out loss {h['loss_before']:.4f} -> {h['loss_after']:.4f} ({h['seconds']:.0f}s)"
            )
        print(f"wrote {result['out']}: {result['layers']} layers")
    return 0


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text, optionally with lossless self-speculative decoding")
    p.add_argument("model", help="model folder, .safetensors or .gguf file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=TEXT_FILE, help="UTF-8 text file holding the prompt")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=128, help="tokens to generate (default 128)")
    p.add_argument("--self-speculative", metavar="SKIP", help="draft with these units bypassed: 'auto', or e.g. '8-15,mlp20,attn3'")
    p.add_argument("--skip", metavar="SKIP", help="bypass these units for the whole generation (lossy; e.g. to try a plan)")
    p.add_argument("--temperature", type=checked(options.real, minimum=0), default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=NON_NEGATIVE_INT, default=0, help="sample from the K most likely tokens (default 0: all)")
    p.add_argument(
        "--top-p", type=checked(options.real, above=0, maximum=1), default=1.0, help="nucleus sampling mass, in (0, 1] (default 1)"
    )
    add_seed(p)
    p.add_argument("--max-draft", type=POSITIVE_INT, default=8, help="longest draft per cycle (default 8)")
    p.add_argument("--draft-length", type=POSITIVE_INT, help="fixed draft length (default: adapts)")
    p.add_argument(
        "--confidence",
        type=checked(options.real, minimum=0, maximum=1),
        default=0.3,
        help="stop drafting below this draft probability, in [0, 1] (default 0.3; 0: never)",
    )
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--compare", action="store_true", help="also run plain decoding on the same prompt and report the speedup")
    add_threads(p)
    p.add_argument("--json", action="store_true", help="print the text and statistics as JSON")
    add_common(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from ..skip import generate, read_prompt

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    g = generate(
        args.model,
        read_prompt(args.prompt_file) if args.prompt_file else args.prompt,
        args.max_new_tokens,
        self_speculative=args.self_speculative,
        skip=args.skip,
        compare=args.compare,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_draft=args.max_draft,
        draft_length=args.draft_length,
        confidence=args.confidence,
        ignore_eos=args.ignore_eos,
    )
    if args.json:
        print(json.dumps(g.to_dict(), indent=2))
        return 0
    print(g.text)
    if not args.quiet:
        _print_generation_stats(g, args.self_speculative is not None, args.temperature > 0)
    return 0


def _print_generation_stats(g, speculative: bool, sampling: bool) -> None:
    s = g.stats
    line = f"{s.new_tokens} tokens in {s.seconds:.2f}s: {s.tokens_per_second:.1f} tokens/s"
    if speculative:
        sets = ", ".join(f"{k} ({v} cycles)" for k, v in sorted(s.skip_sets.items(), key=lambda kv: -kv[1])[:3])
        line += (
            f"; self-speculative: acceptance {s.acceptance:.1%} ({s.accepted}/{s.drafted} drafts), "
            f"{s.tokens_per_cycle:.2f} tokens per full pass; skip {sets}"
        )
    print(line, file=sys.stderr)
    if g.plain is not None:
        same = "identical output" if g.identical else "different output" + (" (expected when sampling)" if sampling else "")
        speedup = f"{g.speedup:.2f}x" if g.speedup is not None else "n/a"
        print(f"plain decoding: {g.plain.stats.tokens_per_second:.1f} tokens/s; speedup {speedup}; {same}", file=sys.stderr)
