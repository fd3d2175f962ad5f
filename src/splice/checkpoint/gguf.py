"""GGUF files (llama.cpp's format) as a model source, dequantized on read.

A GGUF file holds the weights (often quantized), the model's hyper-parameters
and its tokenizer. ``GGUFSource`` presents it like a Hugging Face folder:

- ``config`` is a ``config.json`` dict rebuilt from the GGUF metadata with
  transformers' own GGUF key mapping, completed with the architecture's defaults;
- tensor names are Hugging Face names (``model.layers.0.self_attn.q_proj.weight``),
  found by asking the ``gguf`` package how each HF module would be named in GGUF
  (on an empty "meta" model, so no memory is spent);
- ``get(name)`` dequantizes one tensor to float32 and undoes llama.cpp's
  conversions (the rotary row permutation of Llama's q/k projections, Gemma's
  ``norm - 1`` offset);
- ``tokenizer_dir()`` converts the embedded tokenizer to HF files once and keeps
  them in splice's cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from .reader import ModelSource
from .safetensors_io import TensorInfo

# float32 copies of a tensor alive while one is dequantized: numpy's result, the
# processor's (un-permuted) array and the torch copy the reader hands out
_DEQUANT_COPIES = 3

# llama.cpp architecture name -> transformers model_type, where they differ
_ARCH_TO_MODEL_TYPE = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "command-r": "cohere"}


def cache_root() -> Path:
    """Where splice keeps derived files (converted tokenizers, the model zoo)."""
    env = os.environ.get("SPLICE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "splice"


def _find_gguf(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if not files:
        raise CheckpointError(f"{path}: no .gguf file in this folder")
    if len(files) > 1:
        names = ", ".join(p.name for p in files[:4])
        raise CheckpointError(f"{path}: several .gguf files ({names}); name the one to use")
    return files[0]


class GGUFSource(ModelSource):
    """Read-only view of one ``.gguf`` file under Hugging Face names and conventions."""

    def __init__(self, name: str, path: Path):
        from gguf import GGUFReader

        self.name = name
        self.file = _find_gguf(Path(path))
        self.path = self.file
        try:
            self._reader = GGUFReader(self.file)
        except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
            raise CheckpointError(f"{self.file}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self._arch = self._field("general.architecture")
        if not isinstance(self._arch, str):
            raise CheckpointError(f"{self.file}: GGUF metadata has no general.architecture")
        self._meta = self._parse_metadata()
        self.config = self._build_config()
        self._by_hf, self._infos = self._map_tensors()
        self._tok_dir: Path | None = None

    # -- metadata ---------------------------------------------------------
    def _field(self, key: str):
        f = self._reader.fields.get(key)
        if f is None:
            return None
        try:
            v = f.contents()
        except Exception:  # noqa: BLE001
            return None
        return v

    def _parse_metadata(self) -> dict:
        """Config keys renamed to HF names with transformers' GGUF key table (tokenizer arrays untouched)."""
        from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

        arch = self._arch
        table = GGUF_CONFIG_MAPPING.get(arch)
        if table is None:
            raise CheckpointError(f"{self.file}: GGUF architecture {arch!r} is not supported by transformers' GGUF loader")
        cfg: dict = {"model_type": _ARCH_TO_MODEL_TYPE.get(arch, arch)}
        cfg.update(GGUF_CONFIG_DEFAULTS_MAPPING.get(cfg["model_type"], {}))
        prefix = arch + "."
        for key in self._reader.fields:
            if not key.startswith(prefix):
                continue
            hf_key = table.get(key[len(prefix) :])
            if hf_key is None or hf_key == -1:
                continue
            v = self._field(key)
            if isinstance(v, list) and len(v) == 1:
                v = v[0]
            cfg[hf_key] = v
        names = {t.name for t in self._reader.tensors}
        cfg["tie_word_embeddings"] = "output.weight" not in names
        if "vocab_size" not in cfg:
            tokens = self._reader.fields.get("tokenizer.ggml.tokens")
            if tokens is not None:
                cfg["vocab_size"] = len(tokens.data)
        if cfg["model_type"] == "gemma3_text" and "head_dim" not in cfg:
            cfg["head_dim"] = cfg.get("hidden_size", 0) // max(1, cfg.get("num_attention_heads", 1))
        return {"config": cfg}

    def _build_config(self) -> dict:
        from transformers import AutoConfig

        raw = dict(self._meta.get("config", {}))
        model_type = raw.pop("model_type", None) or _ARCH_TO_MODEL_TYPE.get(self._arch, self._arch)
        model_type = _ARCH_TO_MODEL_TYPE.get(model_type, model_type)
        raw.pop("_model_name_or_path", None)
        for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
            v = self._field(f"tokenizer.ggml.{gguf_key}")
            if v is not None and hf_key not in raw:
                raw[hf_key] = int(v)
        try:
            cfg = AutoConfig.for_model(model_type, **raw)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{self.file}: GGUF architecture {self._arch!r} is not known to transformers ({e})") from None
        d = cfg.to_diff_dict()
        d.pop("transformers_version", None)
        d["model_type"] = model_type
        if not d.get("architectures"):
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
            if cls:
                d["architectures"] = [cls]
        d["torch_dtype"] = d.get("torch_dtype") or "float32"
        return d

    def _map_tensors(self):
        """GGUF tensor name -> HF name, using gguf's name tables on an empty (meta) model."""
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        self._processor = TENSOR_PROCESSORS.get(self._arch, TensorProcessor)(config=self._meta.get("config", {}))
        name_map, hf_shapes = gguf_names(self.config, self._processor, str(self.file), "its GGUF metadata")
        by_hf: dict[str, object] = {}
        infos: dict[str, TensorInfo] = {}
        for t in self._reader.tensors:
            hf = name_map.get(t.name)
            if hf is None:
                continue  # e.g. rope_freqs: computed by transformers, not a parameter
            # GGUF lists dimensions fastest-first; HF (row-major) is the reverse
            shape = tuple(int(x) for x in reversed([int(n) for n in t.shape]))
            want = hf_shapes.get(hf)
            if want is not None and int(np.prod(want)) == int(np.prod(shape)):
                shape = want
            by_hf[hf] = t
            infos[hf] = TensorInfo(hf, torch.float32, shape, self.file, int(t.data_offset), int(t.data_offset) + int(t.n_bytes))
        if not infos:
            raise CheckpointError(f"{self.file}: no GGUF tensor maps to a {self.config['model_type']} parameter")
        return by_hf, infos

    # -- ModelSource (keys, info and membership come from self._infos) -----
    def get(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        info = self.info(name)
        t = self._by_hf[name]
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{self.file}: tensor {t.name}: {e}") from None
        w = self._processor.process(weights=w, name=t.name, tensor_key_mapping={}, parsed_parameters={}).weights
        out = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32).copy())
        return out.reshape(info.shape)

    def tokenizer_dir(self) -> Path | None:
        if self._tok_dir is not None:
            return self._tok_dir
        if self._field("tokenizer.ggml.model") is None:
            return None
        st = self.file.stat()
        key = hashlib.sha256(f"{self.file.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        out = cache_root() / "gguf-tokenizers" / f"{self.file.stem}-{key}"
        if not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists():
            from ..hf import load_tokenizer

            try:
                tok = load_tokenizer(self.file.parent, gguf_file=self.file.name)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{self.file}: cannot convert the embedded tokenizer ({type(e).__name__}: {e})") from None
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            tok.save_pretrained(str(tmp))
            try:
                tmp.rename(out)
            except OSError:  # another process won the race
                pass
        self._tok_dir = out
        return out

    def generation_config(self) -> dict | None:
        gc = {k: self.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if self.config.get(k) is not None}
        return gc or None

    def close(self) -> None:
        self._by_hf.clear()

    @property
    def metadata(self) -> dict:
        """The raw GGUF key/value metadata (without the large tokenizer arrays)."""
        skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
        return {k: self._field(k) for k in self._reader.fields if k not in skip and not k.startswith("GGUF.")}


def gguf_names(config: dict, processor, where: str, what: str) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """The one HF <-> GGUF tensor-name table, for reading and writing: ``(GGUF name -> HF name,
    HF name -> shape)`` of the model ``config`` describes, from the ``gguf`` package's name tables
    (through transformers' GGUF loader) on an empty "meta" model, so no memory is spent.

    Args:
        config: a ``config.json`` dict (with ``model_type``).
        processor: transformers' GGUF tensor processor for the architecture (it may rename).
        where, what: the file and what its config came from, for errors.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    try:
        hf_cfg = AutoConfig.for_model(model_type, **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_cfg)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{where}: cannot build a {model_type} model from {what} ({e})") from None
    try:
        name_map = get_gguf_hf_weights_map(model, processor)
    except NotImplementedError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return name_map, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def gguf_to_folder(
    src: str | os.PathLike | GGUFSource,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    *,
    force: bool = False,
    workers: int | None = None,
    tune_malloc: bool = False,
    quiet: bool = True,
) -> Path:
    """Convert a GGUF file to a plain HF folder (safetensors, config, tokenizer), tensor by tensor.

    Args:
        src: the ``.gguf`` file (or an open ``GGUFSource``).
        out_dir: the output folder (an existing non-empty one only with ``force``).
        dtype: dtype of the written weights.
        force, workers, tune_malloc, quiet: as for ``splice.engine.write_checkpoint``.

    Returns:
        The output folder. Peak memory is a few dequantized tensors, never the model.
    """
    from ..engine.write import Entry, write_checkpoint
    from .compat import config_for_both
    from .side_files import SideFiles

    s = src if isinstance(src, GGUFSource) else GGUFSource(str(src), Path(src))
    try:
        # sorted by name: the order safetensors' own writer gives tensors of one dtype
        entries = [Entry(k, dtype, s.info(k).shape, partial(s.get, k), _DEQUANT_COPIES * 4 * s.info(k).numel) for k in sorted(s.keys())]
        cfg = dict(s.config, torch_dtype=str(dtype).replace("torch.", ""))
        side = SideFiles(
            # keys sorted at every level, as the file always had them (4.x's rope keys included)
            config=json.loads(json.dumps(config_for_both(cfg), sort_keys=True)),
            model=str(s.file),
            tokenizer_dir=s.tokenizer_dir(),
            generation_config=s.generation_config(),
        )
        return write_checkpoint(
            out_dir,
            entries,
            side,
            inputs=[s.file],
            force=force,
            workers=workers,
            tune_malloc=tune_malloc,
            label="gguf conversion",
            quiet=quiet,
        )
    finally:
        if s is not src:
            s.close()
