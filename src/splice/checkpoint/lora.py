"""PEFT LoRA adapters applied to a model as it is read: mergekit's ``model+adapter`` references.

``base_model: ./base+./my-lora`` in a recipe names the model ``./base`` with the
LoRA adapter folder ``./my-lora`` merged into it. mergekit 0.1.5 merges the
adapter with PEFT's ``merge_and_unload`` into a whole model saved in a cache
folder first; splice never builds that model: ``LoraSource`` is a checkpoint
source whose ``get(name)`` reads the base tensor and adds the adapter's change
to it on demand, one tensor at a time.

For a module with factors A (r x in) and B (out x r), as PEFT merges it:

    W' = W + scale * (B @ A)          (transposed when fan_in_fan_out, and for embeddings)
    scale = alpha / r                 (alpha / sqrt(r) with use_rslora)

``r`` and ``alpha`` are the config's ``r`` and ``lora_alpha`` unless a key of
``rank_pattern`` / ``alpha_pattern`` matches the module's name the way PEFT
matches it (the first key ``k`` in file order for which ``(.*\\.)?(k)$`` matches
the whole name). Any other tensor in the adapter (``modules_to_save``, biases
trained with ``bias: all``, the embedding layer PEFT saves beside its LoRA as
``<module>.base_layer.weight``) replaces the model's tensor of the same name
before the change is added. ``lora_B.bias`` (``lora_bias: true``) adds
``scale * bias`` to the module's bias.

**Dtype, as mergekit 0.1.5 gives it.** PEFT upcasts half-precision adapter
weights to float32, computes ``scale * (B @ A)`` in float32 and adds it in place
to the base weight in the base's dtype: ``W' = dtype(float32(W) + delta)``
(for an embedding it rounds the change to the weight's dtype first, then adds). So
the adapted model has the base's dtypes, tensor for tensor (checked against the
model mergekit caches, bit for bit, in ``tests/test_parity_mergekit.py``); a
tensor taken whole from the adapter (``modules_to_save``) is cast to the dtype
of the tensor it replaces.

Refused with one line: DoRA (``use_dora``), PEFT types other than LoRA, layer
replication, trainable tokens, LoRA on raw parameters (``target_parameters``),
a missing or malformed config, factors whose rank or shape do not fit, tensors
the model does not have, and ``adapter_model.bin`` (pickle) unless pickle
weights are allowed (``--allow-pickle``; loaded with ``weights_only``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import CheckpointError, option
from .reader import ModelSource, _hf_cache_lookup
from .safetensors_io import TensorFile, TensorInfo, read_header

SEPARATOR = "+"  # mergekit's: "model+adapter"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."  # PEFT's prefix of every saved tensor name
# PEFT's defaults for a config that leaves them out (LoraConfig)
DEFAULT_R = 8
DEFAULT_ALPHA = 8

# Saved-key suffix of a LoRA factor -> (factor, suffix of the model tensor it changes, embedding layout)
FACTORS = {
    ".lora_A.weight": ("A", ".weight", False),
    ".lora_B.weight": ("B", ".weight", False),
    ".lora_embedding_A": ("A", ".weight", True),  # embeddings: A is (r x vocab), B (dim x r); the change is (B @ A)^T
    ".lora_embedding_B": ("B", ".weight", True),
    ".lora_B.bias": ("bias", ".bias", False),  # lora_bias: true
}
# Config switches that change what a merge means beyond W + scale * B @ A: refused, with what they are.
REFUSED = {
    "use_dora": "a DoRA adapter (use_dora: true)",
    "layer_replication": "an adapter with layer replication",
    "trainable_token_indices": "an adapter with trainable tokens (trainable_token_indices)",
    "target_parameters": "an adapter on raw parameters (target_parameters)",
}


def split_reference(ref: str, base_dir: Path | None = None) -> tuple[str, str] | None:
    """``(model, adapter)`` for a ``model+adapter`` reference, None for a plain model reference.

    A reference that exists as a path (a folder whose name holds a ``+``) is a plain model.
    """
    if SEPARATOR not in ref or _local(ref, base_dir) is not None:
        return None
    parts = ref.split(SEPARATOR)
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise CheckpointError(f"model reference {ref!r}: a LoRA reference is 'model+adapter' (one '+', both sides named)")
    return parts[0], parts[1]


def _local(ref: str, base_dir: Path | None) -> Path | None:
    path = Path(os.path.expanduser(ref))
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        return base_dir / path
    return path if path.exists() else None


def find_adapter(ref: str, base_dir: Path | None = None) -> Path:
    """The adapter folder ``ref`` names: a local folder, or an ``org/name`` id in the local Hugging Face cache."""
    path = _local(ref, base_dir)
    if path is None and ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        path = _hf_cache_lookup(ref)
    if path is None:
        raise CheckpointError(f"LoRA adapter {ref!r} not found (not a local folder, not in the local Hugging Face cache)")
    if not path.is_dir() or not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"LoRA adapter {ref}: no {CONFIG_FILE} in {path} (not a PEFT adapter folder)")
    return path


def pattern_key(patterns: dict, module: str) -> str | None:
    """The first key of ``patterns`` that matches ``module`` as PEFT matches rank/alpha patterns, or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class Change:
    """How the adapter changes one model tensor."""

    kind: str  # "lora" (adds scale * B @ A), "bias" (adds scale * lora_B.bias) or "none" (adds nothing)
    a: str | None = None  # adapter keys of the factors
    b: str | None = None
    scale: float = 1.0
    transpose: bool = False
    embedding: bool = False  # PEFT rounds an embedding's change to the weight's dtype before adding it
    whole: str | None = None  # adapter key of a tensor that replaces the model's first (modules_to_save, a saved base layer)


class Adapter:
    """A PEFT LoRA adapter folder: its config checked, its tensors read one at a time."""

    def __init__(self, name: str, folder: Path, *, allow_pickle: bool = False):
        self.name = name
        self.path = folder
        self.config = self._read_config(folder / CONFIG_FILE)
        self._file: TensorFile | None = None
        self._tensors: dict[str, torch.Tensor] | None = None
        weights = folder / WEIGHTS_FILE
        if weights.is_file():
            self.infos, _ = read_header(weights)
            if self.infos:
                self._file = TensorFile(weights)
        elif (folder / PICKLE_FILE).is_file():
            if not allow_pickle:
                raise CheckpointError(
                    f"LoRA adapter {name}: only pickle weights ({PICKLE_FILE}) found; pass {option('allow_pickle')} to load them (weights_only)"
                )
            self._tensors = self._load_pickle(folder / PICKLE_FILE)
            self.infos = {k: TensorInfo(k, v.dtype, tuple(v.shape), folder / PICKLE_FILE, 0, 0) for k, v in self._tensors.items()}
        else:
            raise CheckpointError(f"LoRA adapter {name}: no {WEIGHTS_FILE} in {folder}")
        if not self.infos:
            raise CheckpointError(f"LoRA adapter {name}: {WEIGHTS_FILE} holds no tensors")

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"LoRA adapter {self.name}: {what}")

    def _read_config(self, path: Path) -> dict:
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        peft_type = cfg.get("peft_type")
        if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
            raise CheckpointError(f"{path}: peft_type is {peft_type!r}; only LoRA adapters (peft_type 'LORA') can be merged")
        for key, what in REFUSED.items():
            if cfg.get(key):
                raise CheckpointError(f"{path}: {what} cannot be merged as W + scale * B @ A; merge it with PEFT first")
        for key, default in (("r", DEFAULT_R), ("lora_alpha", DEFAULT_ALPHA)):
            value = cfg.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (key == "r" and value <= 0):
                raise CheckpointError(f"{path}: {key} must be a {'positive ' if key == 'r' else ''}number, got {value!r}")
        for key in ("rank_pattern", "alpha_pattern"):
            pats = cfg.get(key) or {}
            if not isinstance(pats, dict):
                raise CheckpointError(f"{path}: {key} must be a mapping of module patterns to numbers, got {pats!r}")
            for k, v in pats.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (key == "rank_pattern" and v <= 0):
                    raise CheckpointError(f"{path}: {key}[{k!r}] must be a {'positive ' if key == 'rank_pattern' else ''}number, got {v!r}")
                try:
                    re.compile(k)
                except re.error as e:
                    raise CheckpointError(f"{path}: {key} key {k!r} is not a valid pattern ({e})") from None
        for key in ("fan_in_fan_out", "use_rslora"):
            if not isinstance(cfg.get(key, False), bool):
                raise CheckpointError(f"{path}: {key} must be true or false, got {cfg[key]!r}")
        return cfg

    def _load_pickle(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
            raise CheckpointError(f"{path}: cannot load pickle weights safely ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors")
        return sd

    def tensor(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        return self._file.tensor(self.infos[key])

    def rank_and_alpha(self, module: str) -> tuple[float, float]:
        """The module's r and lora_alpha: a matching rank_pattern / alpha_pattern key, else the config's."""
        cfg = self.config
        r_pats, a_pats = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        rk, ak = pattern_key(r_pats, module), pattern_key(a_pats, module)
        r = r_pats[rk] if rk is not None else cfg.get("r", DEFAULT_R)
        alpha = a_pats[ak] if ak is not None else cfg.get("lora_alpha", DEFAULT_ALPHA)
        return r, alpha

    def scale(self, module: str) -> tuple[float, float]:
        """(scale, r) of a module: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
        r, alpha = self.rank_and_alpha(module)
        return (alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r), r

    def changes(self, model: ModelSource) -> dict[str, Change]:
        """Model tensor name -> how this adapter changes it, every shape checked against ``model``."""
        factors: dict[str, dict[str, str]] = {}  # module -> factor -> key
        layout: dict[str, bool] = {}
        wholes: dict[str, str] = {}  # model tensor -> adapter key of its replacement
        out: dict[str, Change] = {}
        for key in self.infos:
            if not key.startswith(KEY_PREFIX):
                raise self._fail(f"tensor {key!r} does not start with {KEY_PREFIX!r} (not a PEFT LoRA state dict)")
            rest = key[len(KEY_PREFIX) :]
            suffix = next((s for s in FACTORS if rest.endswith(s)), None)
            if suffix is not None:
                factor, _, embedding = FACTORS[suffix]
                module = rest[: -len(suffix)]
                factors.setdefault(module, {})[factor] = key
                layout[module] = layout.get(module, False) or embedding
                continue
            if "lora_magnitude_vector" in rest:
                raise self._fail(f"tensor {key!r} is a DoRA magnitude; DoRA adapters cannot be merged as W + scale * B @ A")
            if ".lora_" in rest or "trainable_tokens" in rest:
                raise self._fail(f"tensor {key!r} is not a LoRA factor splice knows (lora_A/lora_B/lora_embedding_A/B)")
            wholes[rest.replace(".base_layer.", ".")] = key  # PEFT saves a wrapped layer's own weight as <module>.base_layer.weight
        for module, fs in factors.items():
            a, b, bias = fs.get("A"), fs.get("B"), fs.get("bias")
            if (a is None) != (b is None) or (bias is not None and a is None):
                have = ", ".join(sorted(fs))
                raise self._fail(f"module {module} has LoRA factor(s) {have} but not both A and B")
            scale, r = self.scale(module)
            sa, sb = self.infos[a].shape, self.infos[b].shape
            if len(sa) != 2 or len(sb) != 2 or sb[1] != sa[0]:
                raise self._fail(
                    f"module {module}: lora A {list(sa)} and B {list(sb)} are not factors of one matrix (A is r x in, B out x r)"
                )
            if sa[0] != r:
                raise self._fail(f"module {module}: its factors have rank {sa[0]}, {CONFIG_FILE} gives it r = {r:g}")
            transpose = layout[module] or bool(self.config.get("fan_in_fan_out", False))
            out[module + ".weight"] = Change("lora", a=a, b=b, scale=scale, transpose=transpose, embedding=layout[module])
            if bias is not None:
                out[module + ".bias"] = Change("bias", b=bias, scale=scale)
        for name, key in wholes.items():
            out[name] = replace(out.get(name, Change("none")), whole=key)
        for name, ch in list(out.items()):
            if name not in model:
                raise self._fail(f"changes tensor {name!r}, which model {model.name} does not have")
            want = tuple(model.info(name).shape)
            shapes = [tuple(self.infos[ch.whole].shape)] if ch.whole is not None else []
            if ch.kind == "lora":
                rows, cols = self.infos[ch.b].shape[0], self.infos[ch.a].shape[1]
                shape = (cols, rows) if ch.transpose else (rows, cols)
                if shape != want and shape[::-1] == want and not layout[name[: -len(".weight")]]:
                    # PEFT orients a layer's change by its type (Linear, or GPT-2's Conv1D), whatever fan_in_fan_out says
                    out[name] = replace(ch, transpose=not ch.transpose)
                    shape = want
                shapes.append(shape)
            elif ch.kind == "bias":
                shapes.append(tuple(self.infos[ch.b].shape))
            for shape in shapes:
                if shape != want:
                    raise self._fail(
                        f"shape mismatch for tensor {name}: the adapter's is {list(shape)}, model {model.name}'s is {list(want)}"
                    )
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool) -> torch.Tensor:
    """``scale * (B @ A)`` (transposed when asked), computed in float32 as PEFT merges it."""
    delta = b.float() @ a.float()
    return (delta.T if transpose else delta) * scale


class LoraSource(ModelSource):
    """A model with a LoRA adapter merged in, tensor by tensor on read (see the module docstring)."""

    def __init__(self, name: str, model: ModelSource, adapter: Adapter):
        self.name = name
        self.model = model
        self.adapter = adapter
        self.path = model.path
        self.changes = adapter.changes(model)
        self.config = model.config

    def keys(self) -> list[str]:
        return self.model.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.model

    def info(self, name: str) -> TensorInfo:
        return self.model.info(name)  # same name, dtype and shape: the adapter changes values only

    def get(self, name: str) -> torch.Tensor:
        w = self.model.get(name)
        ch = self.changes.get(name)
        if ch is None:
            return w
        if ch.whole is not None:
            w = self.adapter.tensor(ch.whole).to(w.dtype)
        if ch.kind == "none":
            return w
        if ch.kind == "bias":
            delta = self.adapter.tensor(ch.b).float() * ch.scale
        else:
            delta = lora_delta(self.adapter.tensor(ch.a), self.adapter.tensor(ch.b), ch.scale, ch.transpose)
        if w.dtype in (torch.float32, torch.float64):
            return w + delta  # not in place: a pickle source hands out the tensors it keeps
        if ch.embedding:
            return w + delta.to(w.dtype)  # PEFT's Embedding.merge: the change rounded first, then added
        return w.float().add_(delta).to(w.dtype)  # Linear: float32(W) + delta, rounded once to the base's dtype

    def input_paths(self) -> list[Path]:
        return [*self.model.input_paths(), self.adapter.path]

    def tokenizer_dir(self) -> Path | None:
        return self.model.tokenizer_dir()

    def generation_config(self) -> dict | None:
        return self.model.generation_config()

    def close(self) -> None:
        self.model.close()
        self.adapter.close()


def open_lora(name: str, model_ref: str, adapter_ref: str, *, allow_pickle: bool = False, base_dir: Path | None = None) -> LoraSource:
    """``model_ref`` with the adapter ``adapter_ref`` merged in, as one source named ``name``."""
    from .reader import open_model

    folder = find_adapter(adapter_ref, base_dir)
    model = open_model(model_ref, allow_pickle=allow_pickle, base_dir=base_dir)
    try:
        adapter = Adapter(adapter_ref, folder, allow_pickle=allow_pickle)
    except BaseException:
        model.close()
        raise
    try:
        return LoraSource(name, model, adapter)
    except BaseException:
        model.close()
        adapter.close()
        raise
