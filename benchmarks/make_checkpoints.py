"""Build random Llama checkpoints of a realistic size for the merge benchmark.

    python benchmarks/make_checkpoints.py --params 500M            # base + 3 fine-tunes
    python benchmarks/make_checkpoints.py --params 100M --finetunes 3
    python benchmarks/make_checkpoints.py --params 1B               # for the flat-memory check

Writes ``benchmarks/.work/llama-<size>/{base,ft1,ft2,...}``: Hugging Face model
folders (``config.json`` + ``model.safetensors``, bf16) that
``transformers.AutoModelForCausalLM.from_pretrained`` loads. Nothing is
downloaded. Each fine-tune is the base plus small Gaussian noise, so task
vectors look like small, dense, sign-mixed deltas, as in real fine-tunes.

The files are written tensor by tensor: the safetensors header is laid out
first, then each tensor is generated (for the base and every fine-tune at once)
and appended, so building needs a few tensors of memory, never a model. Every
tensor comes from its own generator seeded from (seed, tensor name, model), so
the output is bit-identical for the same arguments, whatever the order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"

# Llama-family shapes. 100M and 500M are scaled like the small Llama-architecture
# models on the Hub (head dim 64, grouped-query attention, SwiGLU ~2.7x hidden);
# 1B is TinyLlama-1.1B's exact shape.
PRESETS: dict[str, dict] = {
    "20M": dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, vocab_size=32000
    ),
    "100M": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, vocab_size=32000
    ),
    "150M": dict(  # the issue-11 per-method table's size
        hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4, vocab_size=32000
    ),
    "500M": dict(
        hidden_size=1280, intermediate_size=3456, num_hidden_layers=24, num_attention_heads=20, num_key_value_heads=4, vocab_size=32000
    ),
    "1B": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000
    ),
}

INIT_STD = 0.02  # weight scale of the base (Llama's initializer_range)


def llama_config(shape: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "initializer_range": INIT_STD,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        **shape,
    }


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of a LlamaForCausalLM with this config, in the order HF writes them."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def count_params(cfg: dict) -> int:
    n = 0
    for _, shape in tensor_shapes(cfg):
        k = 1
        for s in shape:
            k *= s
        n += k
    return n


def _generator(seed: int, name: str, model: str) -> torch.Generator:
    h = hashlib.sha256(f"{seed}/{model}/{name}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
    return g


class StreamingSafetensors:
    """A single-file safetensors writer: header first, then tensors appended in order."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype_name: str, itemsize: int):
        header: dict = {"__metadata__": {"format": "pt"}}
        pos = 0
        self.order: list[tuple[str, int]] = []
        for name, shape in entries:
            n = itemsize
            for s in shape:
                n *= s
            header[name] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.order.append((name, n))
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def append(self, name: str, t: torch.Tensor) -> None:
        want, n = self.order[self.next]
        if name != want:
            raise RuntimeError(f"tensor {name} written out of order (expected {want})")
        buf = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        if len(buf) != n:
            raise RuntimeError(f"tensor {name}: {len(buf)} bytes, planned {n}")
        self.f.write(buf)
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            raise RuntimeError("not every tensor was written")
        self.f.close()


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = _generator(seed, name, "base")
    if len(shape) == 1:  # RMSNorm weights: around 1
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return INIT_STD * torch.randn(shape, generator=g)


def build(size: str, finetunes: int, seed: int, noise: float, out: Path | None = None, force: bool = False) -> Path:
    shape = PRESETS[size]
    cfg = llama_config(shape)
    entries = tensor_shapes(cfg)
    root = out or WORK / f"llama-{size}"
    names = ["base"] + [f"ft{k + 1}" for k in range(finetunes)]
    stamp = root / "BUILD.json"
    meta = {"size": size, "params": count_params(cfg), "finetunes": finetunes, "seed": seed, "noise": noise, "config": cfg}
    if stamp.exists() and not force:
        try:
            if json.loads(stamp.read_text()) == meta:
                print(f"{root}: up to date ({meta['params'] / 1e6:.0f}M parameters, base + {finetunes} fine-tunes)")
                return root
        except ValueError:
            pass
    root.mkdir(parents=True, exist_ok=True)
    if stamp.exists():
        stamp.unlink()
    writers = []
    for n in names:
        d = root / n
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
        writers.append(StreamingSafetensors(d / "model.safetensors", entries, "BF16", 2))
    t0 = time.perf_counter()
    done = 0
    total = meta["params"]
    for name, shp in entries:
        b = base_tensor(name, shp, seed)
        writers[0].append(name, b.to(torch.bfloat16))
        scale = noise * (0.05 if len(shp) == 1 else INIT_STD)
        for k, w in enumerate(writers[1:], start=1):
            delta = torch.randn(shp, generator=_generator(seed, name, names[k]))
            w.append(name, (b + scale * delta).to(torch.bfloat16))
            del delta
        del b
        k = 1
        for s in shp:
            k *= s
        done += k
        if sys.stderr.isatty():
            print(f"\r{root.name}: {done / total:6.1%}", end="", file=sys.stderr)
    for w in writers:
        w.close()
    if sys.stderr.isatty():
        print(file=sys.stderr)
    stamp.write_text(json.dumps(meta, indent=2) + "\n")
    size_gb = sum((root / n / "model.safetensors").stat().st_size for n in names) / 1e9
    print(f"{root}: {total / 1e6:.0f}M parameters, base + {finetunes} fine-tunes, {size_gb:.2f} GB in {time.perf_counter() - t0:.1f} s")
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--params",
        default="500M",
        choices=sorted(PRESETS, key=lambda s: count_params(llama_config(PRESETS[s]))),
        help="model size preset (default 500M)",
    )
    ap.add_argument("--finetunes", type=int, default=3, help="fine-tunes besides the base (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.1, help="fine-tune delta std as a fraction of the base's weight scale (default 0.1)")
    ap.add_argument("--out", type=Path, help="output folder (default benchmarks/.work/llama-<size>)")
    ap.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    ap.add_argument("--list", action="store_true", help="print the presets and their parameter counts")
    a = ap.parse_args(argv)
    if a.list:
        for k, v in PRESETS.items():
            print(f"{k:>5}: {count_params(llama_config(v)) / 1e6:7.1f}M parameters  {v}")
        return 0
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    build(a.params, a.finetunes, a.seed, a.noise, a.out, a.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
