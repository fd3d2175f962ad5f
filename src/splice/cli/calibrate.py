"""``splice calibrate``: measure a model on calibration text for data-aware merges (``regmean``)."""

from __future__ import annotations

import argparse

from .. import options
from .common import POSITIVE_INT, SEQ_LEN, TEXT_FILE, add_common, add_force, add_seed, checked


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..calibration import calibrate

    s = calibrate(
        args.model,
        args.text,
        args.out,
        tokens=args.tokens,
        seed=args.seed,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        fisher=args.fisher,
        force=args.force,
        quiet=args.quiet,
    )
    if s["cached"]:
        print(f"reused {s['out']} (the same model, text and settings were measured before): {s['tokens']} tokens, {s['grams']} input Grams")
    else:
        print(f"wrote {s['out']}: {s['tokens']} tokens in {s['windows']} windows, {s['grams']} input Grams in {s['seconds']:.1f}s")
    return 0


def add_calibrate(sub) -> None:
    from ..calibration.text import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, DEFAULT_TOKENS

    p = sub.add_parser("calibrate", help="measure a model on calibration text: the statistics data-aware merges (regmean) read")
    p.add_argument("model", help="model folder, .safetensors/.gguf file or cached Hugging Face id")
    p.add_argument("--text", required=True, type=TEXT_FILE, metavar="FILE", help="UTF-8 text (blank-line separated documents) or .jsonl")
    p.add_argument("--tokens", type=POSITIVE_INT, default=DEFAULT_TOKENS, metavar="N", help=f"tokens to measure (default {DEFAULT_TOKENS})")
    p.add_argument("--seq-len", type=SEQ_LEN, default=DEFAULT_SEQ_LEN, metavar="N", help=f"window length (default {DEFAULT_SEQ_LEN})")
    p.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"windows per forward (default {DEFAULT_BATCH_SIZE})",
    )
    p.add_argument("--fisher", action="store_true", help="also measure the diagonal Fisher (a backward per window), for the fisher method")
    add_seed(p)
    p.add_argument(
        "-o",
        "--out",
        type=checked(options.output_file),
        metavar="FILE",
        help="statistics file to write (.safetensors); default: the statistics cache ($SPLICE_CACHE/stats, ~/.cache/splice/stats), "
        "reused when the same model, text and settings were measured before",
    )
    add_force(p)
    add_common(p)
    p.set_defaults(func=cmd_calibrate)
