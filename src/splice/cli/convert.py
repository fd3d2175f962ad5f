"""``splice convert``: write a model in another format (a GGUF file); parse, call the library, print."""

from __future__ import annotations

import argparse

from .common import add_allow_pickle, add_common, add_force, add_gguf


def cmd_convert(args: argparse.Namespace) -> int:
    from ..checkpoint.gguf_write import write_gguf

    f = write_gguf(args.model, args.gguf, gguf_type=args.gguf_type, force=args.force, allow_pickle=args.allow_pickle, quiet=args.quiet)
    size = f.stat().st_size
    print(f"wrote {f}: GGUF {args.gguf_type}, {size / 1e6:.1f} MB")
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write a model (folder, .safetensors or .gguf) as a GGUF file for llama.cpp")
    p.add_argument("model", help="model folder, .safetensors or .gguf file, or a cached Hugging Face id")
    add_gguf(p, required=True, what="the GGUF file to write")
    add_force(p)
    add_allow_pickle(p)
    add_common(p)
    p.set_defaults(func=cmd_convert)
