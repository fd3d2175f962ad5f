"""Writing a model as one GGUF file (llama.cpp's format), tensor by tensor.

``write_gguf`` reads any model splice opens (a folder, a ``.safetensors`` file, a ``.gguf``)
and writes:

- the architecture's hyper-parameters under llama.cpp's keys: transformers' GGUF key table
  (the one ``GGUFSource`` reads with) turned around;
- the tensors under GGUF names: the reverse of the reader's table (``gguf.gguf_names``),
  with llama.cpp's conversions applied (Llama's q/k rows permuted into the interleaved
  rotary order its kernels use, the permutation the reader undoes);
- the tokenizer (``tokenizer.ggml.*``) from ``tokenizer.json``: a byte-level BPE as
  ``gpt2``, a SentencePiece-style BPE (byte fallback, ``▁``) as ``llama``, and the chat template.

Streaming: ``gguf.GGUFWriter`` takes each tensor's name, shape and type up front
(``add_tensor_info``), writes the header, metadata and tensor index, then takes the data one
tensor at a time (``write_tensor_data``); each tensor is read, converted, written and dropped,
so peak memory is about one tensor (plus its quantized copy). The file is written in a
staging folder beside the target and moved in only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..options import GGUF_TYPES
from .compat import config_for_both
from .writer import _stage_beside, check_output_file, remove_created

# transformers model_type -> GGUF architecture, for the families written and read back in tests
WRITABLE_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# architectures whose q/k projections llama.cpp stores with rows permuted (the reader undoes it)
_PERMUTE_QK = {"llama"}

# llama.cpp's general.file_type (LlamaFileType): what most tensors are stored as
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}

# tokenizer.ggml.token_type values (llama.cpp's TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def check_gguf_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        from ..registry import unknown_choice

        raise CheckpointError(unknown_choice("gguf_type", gguf_type, GGUF_TYPES)[0])
    return gguf_type


def check_gguf_output(out: str | os.PathLike, force: bool = False, *, inputs=()) -> Path:
    """Where a GGUF may be written (see ``check_output_file``); call before any work."""
    if Path(os.fspath(out)).suffix != ".gguf":
        raise CheckpointError(f"output {out}: a GGUF file name ends in .gguf")
    return check_output_file(out, force, inputs=inputs)


# ------------------------------------------------------------------ tensors


def _qtype(shape: tuple[int, ...], gguf_type: str):
    """What one tensor is stored as: 1-D tensors (norms, biases) stay float32 as llama.cpp keeps
    them; a Q8_0 tensor whose rows do not split into 32-value blocks falls back to float16."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2 or gguf_type == "f32":
        return Q.F32
    if gguf_type == "q8_0":
        return Q.Q8_0 if shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0] == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[gguf_type]


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape)) if shape else 1
    return n // block * size


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a Llama q/k projection in llama.cpp's order (each head's rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: np.ndarray, qtype) -> np.ndarray:
    from gguf import quants

    return quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


# ------------------------------------------------------------------ metadata


def _metadata(cfg: dict, arch: str) -> list[tuple[str, object]]:
    """``(key, value)`` of the architecture's hyper-parameters: transformers' GGUF key table, reversed."""
    from transformers.integrations import GGUF_CONFIG_MAPPING

    table = GGUF_CONFIG_MAPPING[cfg["model_type"]]
    out = []
    for suffix, hf_key in table.items():
        if hf_key is None:
            continue
        v = cfg.get(hf_key)
        if hf_key == "head_dim" and v is None:
            v = cfg["hidden_size"] // cfg["num_attention_heads"]
        if v is None or isinstance(v, (dict, list)):
            continue
        out.append((f"{arch}.{suffix}", v))
    return out


def _add(writer, key: str, v) -> None:
    if isinstance(v, bool):
        writer.add_bool(key, v)
    elif isinstance(v, int):
        writer.add_uint32(key, v)
    elif isinstance(v, float):
        writer.add_float32(key, v)
    elif isinstance(v, str):
        writer.add_string(key, v)


# ------------------------------------------------------------------ tokenizer


def _read_json(p: Path) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: not readable JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _walk(node, kind: str) -> list[dict]:
    """Every component of type ``kind`` in a tokenizer.json pre-tokenizer/decoder/normalizer tree."""
    if not isinstance(node, dict):
        return []
    found = [node] if node.get("type") == kind else []
    for k in ("pretokenizers", "decoders", "normalizers", "processors"):
        for sub in node.get(k) or []:
            found += _walk(sub, kind)
    return found


def _pre_name(tj: dict) -> str:
    """llama.cpp's name for the byte-level pre-tokenizer (``tokenizer.ggml.pre``), from its split regex:
    transformers' own name -> regex table, read backwards."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    for split in _walk(tj.get("pre_tokenizer"), "Split"):
        pattern = (split.get("pattern") or {}).get("Regex")
        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if pattern == regex:
                return name
    return "gpt-2" if _walk(tj.get("pre_tokenizer"), "ByteLevel") else "default"


def tokenizer_metadata(tok_dir: Path | None, cfg: dict, vocab_size: int) -> tuple[list[tuple[str, str, object]], str | None]:
    """``([(kind, key, value)], warning)``: the ``tokenizer.ggml.*`` keys and chat template of the
    tokenizer in ``tok_dir``; kind is ``str``, ``u32``, ``bool``, ``arr`` or ``f32arr``. A tokenizer
    GGUF cannot describe (not BPE) gives no keys and a warning."""
    if tok_dir is None or not (Path(tok_dir) / "tokenizer.json").is_file():
        return [], "no tokenizer.json: the GGUF has no tokenizer"
    tok_dir = Path(tok_dir)
    tj = _read_json(tok_dir / "tokenizer.json")
    tc = _read_json(tok_dir / "tokenizer_config.json") if (tok_dir / "tokenizer_config.json").is_file() else {}
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        return [], f"tokenizer model {model.get('type')!r} is not BPE: the GGUF has no tokenizer"
    byte_level = bool(_walk(tj.get("pre_tokenizer"), "ByteLevel") or _walk(tj.get("decoder"), "ByteLevel"))
    if not byte_level and not model.get("byte_fallback"):
        return [], "a BPE tokenizer neither byte-level nor with byte fallback: the GGUF has no tokenizer"
    by_id: dict[int, str] = {int(i): t for t, i in (model.get("vocab") or {}).items()}
    added = {int(a["id"]): a for a in tj.get("added_tokens") or []}
    for i, a in added.items():
        by_id[i] = a["content"]
    n = max(vocab_size, max(by_id, default=-1) + 1)
    tokens, types = [], []
    for i in range(n):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            continue
        tokens.append(t)
        a = added.get(i)
        if not byte_level and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(_BYTE)  # a byte-fallback token, even where tokenizer.json lists it as added
        elif a is not None:
            types.append(_CONTROL if a.get("special") else _USER_DEFINED)
        elif t == model.get("unk_token"):
            types.append(_UNKNOWN)
        else:
            types.append(_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    keys: list[tuple[str, str, object]] = [("str", "tokenizer.ggml.model", "gpt2" if byte_level else "llama")]
    if byte_level:
        keys.append(("str", "tokenizer.ggml.pre", _pre_name(tj)))
    keys += [("arr", "tokenizer.ggml.tokens", tokens), ("arr", "tokenizer.ggml.token_type", types)]
    if not byte_level:  # SentencePiece-style: llama.cpp ranks merges by score; earlier tokens rank higher
        keys.append(("f32arr", "tokenizer.ggml.scores", [-float(i) for i in range(n)]))
        keys.append(("bool", "tokenizer.ggml.add_space_prefix", bool(_walk(tj.get("pre_tokenizer"), "Metaspace"))))
    if merges:
        keys.append(("arr", "tokenizer.ggml.merges", merges))
    ids = {t: i for i, t in enumerate(tokens)}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        t = tc.get(f"{name}_token")  # the tokenizer's own word first, then config.json's id
        t = t.get("content") if isinstance(t, dict) else t
        v = ids.get(t) if isinstance(t, str) else None
        if v is None:
            v = cfg.get(f"{name}_token_id")
            v = (v[0] if v else None) if isinstance(v, list) else v
        if isinstance(v, int) and 0 <= v < n:
            keys.append(("u32", f"tokenizer.ggml.{key}", v))
    for flag in ("add_bos_token", "add_eos_token"):
        if isinstance(tc.get(flag), bool):
            keys.append(("bool", f"tokenizer.ggml.{flag}", tc[flag]))
    template = None
    if (tok_dir / "chat_template.jinja").is_file():
        template = (tok_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(tc.get("chat_template"), str):
        template = tc["chat_template"]
    if template:
        keys.append(("str", "tokenizer.chat_template", template))
    return keys, None


def _add_tokenizer(writer, keys) -> None:
    from gguf import GGUFValueType

    for kind, key, v in keys:
        if kind == "str":
            writer.add_string(key, v)
        elif kind == "u32":
            writer.add_uint32(key, v)
        elif kind == "bool":
            writer.add_bool(key, v)
        elif kind == "f32arr":
            writer.add_key_value(key, v, GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
        elif key == "tokenizer.ggml.token_type":
            writer.add_key_value(key, v, GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
        else:
            writer.add_array(key, v)


# ------------------------------------------------------------------ the file


def write_gguf(
    model,
    out: str | os.PathLike,
    *,
    gguf_type: str = "f16",
    force: bool = False,
    allow_pickle: bool = False,
    inputs=(),
    quiet: bool = True,
) -> Path:
    """Write ``model`` as one GGUF file.

    Args:
        model: a model reference (folder, ``.safetensors``, ``.gguf``, cached Hub id) or an open ``ModelSource``.
        out: the ``.gguf`` file (never an input; an existing file only with ``force``).
        gguf_type: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (1-D tensors stay float32, as llama.cpp keeps them).
        force: replace an existing file.
        allow_pickle: read ``.bin``/``.pt`` weights.
        inputs: further paths the output must not be (the recipe of a merge, ...).
        quiet: no progress line.

    Returns:
        The written file. Peak memory is about one tensor.
    """
    from gguf import GGUFWriter

    from .reader import ModelSource, open_model

    check_gguf_type(gguf_type)
    src = model if isinstance(model, ModelSource) else open_model(model, allow_pickle=allow_pickle)
    try:
        target = check_gguf_output(out, force, inputs=[src.path, *inputs])
        cfg = config_for_both(src.config)
        model_type = cfg.get("model_type")
        arch = WRITABLE_ARCHITECTURES.get(model_type)
        if arch is None:
            raise CheckpointError(
                f"model {src.name}: GGUF output supports model types {', '.join(WRITABLE_ARCHITECTURES)}, not {model_type!r}"
            )
        plan = _plan(src, cfg, arch, gguf_type)
        tok_keys, warning = tokenizer_metadata(src.tokenizer_dir(), cfg, int(cfg.get("vocab_size") or 0))
        if warning and not quiet:
            print(f"warning: {src.name}: {warning}", file=sys.stderr)
        tmp, created = _stage_beside(target)
        try:
            part = tmp / target.name
            w = GGUFWriter(path=None, arch=arch)
            w.add_name(Path(str(src.name)).name or arch)
            w.add_file_type(_FILE_TYPE[gguf_type])
            if gguf_type == "q8_0":
                w.add_quantization_version(2)
            for key, v in _metadata(cfg, arch):
                _add(w, key, v)
            _add_tokenizer(w, tok_keys)
            for gname, hf, shape, qtype in plan:
                w.add_tensor_info(gname, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
            w.open_output_file(part)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            heads = {"attn_q": cfg.get("num_attention_heads"), "attn_k": cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")}
            for i, (gname, hf, shape, qtype) in enumerate(plan):
                a = src.get(hf).float().numpy().reshape(shape)
                kind = gname.split(".")[-2]
                if arch in _PERMUTE_QK and kind in heads and a.ndim == 2:
                    a = _llama_cpp_permute(a, int(heads[kind]))
                w.write_tensor_data(_encode(a, qtype))
                del a
                if not quiet:
                    print(f"\rgguf: {i + 1}/{len(plan)} tensors", end="", file=sys.stderr)
            w.close()
            if not quiet:
                print(file=sys.stderr)
            os.replace(part, target)
        except OSError as e:
            raise CheckpointError(f"cannot write {target}: {e.strerror or e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.exists():
                remove_created(created)
        return target
    finally:
        if src is not model:
            src.close()


def _plan(src, cfg: dict, arch: str, gguf_type: str) -> list[tuple[str, str, tuple[int, ...], object]]:
    """``(GGUF name, HF name, shape, type)`` of every tensor written, in the source's order."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    from .gguf import gguf_names

    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=cfg)
    to_hf, _ = gguf_names({k: v for k, v in src.config.items()}, processor, str(src.name), "its config.json")
    to_gguf = {hf: g for g, hf in to_hf.items()}
    tied = bool(cfg.get("tie_word_embeddings", False))
    plan = []
    for hf in src.keys():
        if hf == "lm_head.weight" and tied:
            continue  # a GGUF without output.weight is a tied model
        g = to_gguf.get(hf)
        if g is None:
            raise CheckpointError(f"model {src.name}: tensor {hf!r} has no GGUF name for architecture {arch!r}")
        shape = tuple(src.info(hf).shape)
        plan.append((g, hf, shape, _qtype(shape, gguf_type)))
    if not plan:
        raise CheckpointError(f"model {src.name}: no tensors to write")
    return plan


__all__ = ["GGUF_TYPES", "WRITABLE_ARCHITECTURES", "check_gguf_output", "check_gguf_type", "tokenizer_metadata", "write_gguf"]
