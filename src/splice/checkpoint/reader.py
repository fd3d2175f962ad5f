"""Open a model given as a folder, a file or a Hugging Face id, and read it tensor by tensor.

Every source exposes the same small interface (``ModelSource``): its config, the
names, shapes and dtypes of its tensors, and ``get(name)`` that loads one
tensor. Nothing loads a whole model.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from .. import architecture as arch
from ..errors import CheckpointError, option
from .safetensors_io import TensorFile, TensorInfo, read_header

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class ModelSource:
    """Read-only, lazy view of one model."""

    name: str  # the reference as the user wrote it
    path: Path  # folder (or file) on disk
    config: dict
    _infos: dict[str, TensorInfo]  # every tensor's name, dtype, shape and place, read from headers

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"model {self.name}: tensor {name!r} not found") from None

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored (dtype unchanged), in memory the caller owns."""
        raise NotImplementedError

    def tokenizer_dir(self) -> Path | None:
        """A folder holding this model's tokenizer files, if any."""
        return None

    def input_paths(self) -> list[Path]:
        """Every path this source reads (an output may be none of them, nor lie inside one)."""
        return [self.path]

    def generation_config(self) -> dict | None:
        return None

    def close(self) -> None:
        pass

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def check_layer_count(name: str, config: dict, names: Iterable[str]) -> None:
    """A one-line error if ``config.json``'s layer count disagrees with the layers the tensors hold.

    Models with several layer stacks (a vision tower beside the language model) pass when
    one stack holds exactly the declared layers.
    """
    declared = arch.num_layers(config)
    if not declared:
        return
    stacks: dict[str, set[int]] = {}
    sizes: dict[str, int] = {}
    for n in names:
        role = arch.classify(n)
        if role.layer is not None:
            stacks.setdefault(role.prefix, set()).add(role.layer)
            sizes[role.prefix] = sizes.get(role.prefix, 0) + 1
    if not stacks:
        return
    extra = arch.text_config(config).get("num_nextn_predict_layers") or 0  # DeepSeek's multi-token-prediction layers
    allowed = ({*range(declared)}, {*range(declared + extra)}) if isinstance(extra, int) else ({*range(declared)},)
    if any(layers in allowed for layers in stacks.values()):
        return
    main = max(sizes, key=sizes.get)
    held = max(stacks[main]) + 1
    gaps = "" if len(stacks[main]) == held else f", {held - len(stacks[main])} of them missing"
    key = next(k for k in arch.NUM_LAYER_KEYS if arch.text_config(config).get(k) == declared)
    raise CheckpointError(
        f"model {name}: config.json says {key} = {declared} but its tensors hold {held} layers ({main}.0 to {main}.{held - 1}{gaps})"
    )


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


class FolderSource(ModelSource):
    """A Hugging Face model folder with safetensors weights (sharded or not)."""

    def __init__(self, name: str, folder: Path):
        self.name = name
        self.path = folder
        cfg = folder / "config.json"
        self.config = _read_json(cfg) if cfg.exists() else {}
        self._infos: dict[str, TensorInfo] = {}
        files = self._weight_files(folder)
        for f in files:
            infos, _ = read_header(f)
            for k, v in infos.items():
                if k in self._infos:
                    raise CheckpointError(f"{folder}: tensor {k!r} appears in two shards")
                self._infos[k] = v
        check_layer_count(name, self.config, self._infos)
        self._maps: dict[Path, TensorFile] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _weight_files(folder: Path) -> list[Path]:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            data = _read_json(index)
            wm = data.get("weight_map")
            if not isinstance(wm, dict):
                raise CheckpointError(f"{index}: no weight_map")
            files = sorted({folder / v for v in wm.values()})
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{index}: shard {f.name} is missing")
            return files
        single = folder / "model.safetensors"
        if single.exists():
            return [single]
        files = sorted(folder.glob("*.safetensors"))
        if files:
            return files
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
            raise CheckpointError(
                f"{folder}: only pickle weights (.bin/.pt) found; pass {option('allow_pickle')} to load them (weights_only)"
            )
        raise CheckpointError(f"{folder}: no model weights (*.safetensors) found")

    def get(self, name: str) -> torch.Tensor:
        info = self.info(name)
        mf = self._maps.get(info.file)
        if mf is None:
            with self._lock:
                mf = self._maps.get(info.file)
                if mf is None:
                    mf = self._maps[info.file] = TensorFile(info.file)
        return mf.tensor(info)

    def tokenizer_dir(self) -> Path | None:
        return self.path if any((self.path / f).exists() for f in TOKENIZER_FILES) else None

    def generation_config(self) -> dict | None:
        p = self.path / "generation_config.json"
        return _read_json(p) if p.exists() else None

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


class PickleSource(FolderSource):
    """``pytorch_model*.bin`` folders, loaded with ``weights_only=True`` (only with --allow-pickle)."""

    def __init__(self, name: str, folder: Path):
        self.name = name
        self.path = folder
        cfg = folder / "config.json"
        self.config = _read_json(cfg) if cfg.exists() else {}
        index = folder / "pytorch_model.bin.index.json"
        if index.exists():
            files = sorted({folder / v for v in _read_json(index).get("weight_map", {}).values()})
        else:
            files = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
        self._tensors: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
                raise CheckpointError(f"{f}: cannot load pickle weights safely ({type(e).__name__}: {e})") from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f}: not a state dict")
            self._tensors.update(sd)
        self._infos = {k: TensorInfo(k, v.dtype, tuple(v.shape), f, 0, v.numel() * v.element_size()) for k, v in self._tensors.items()}
        check_layer_count(name, self.config, self._infos)
        self._maps = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> torch.Tensor:
        self.info(name)
        return self._tensors[name]


def _hf_cache_lookup(ref: str) -> Path | None:
    """Resolve ``org/name`` through the local Hugging Face cache only (never the network)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, bad id, ...: all mean "not found locally"
        return None


def open_model(ref: str | os.PathLike, *, allow_pickle: bool = False, base_dir: Path | None = None) -> ModelSource:
    """Open ``ref``: a model folder, a ``.gguf`` file (or folder holding one), a cached HF id, or ``model+adapter``."""
    name = str(ref)
    from .lora import open_lora, split_reference  # "model+adapter": mergekit's LoRA reference

    lora = split_reference(name, base_dir)
    if lora is not None:
        return open_lora(name, *lora, allow_pickle=allow_pickle, base_dir=base_dir)
    path = Path(os.path.expanduser(name))
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if not path.exists():
        cached = _hf_cache_lookup(name) if name.count("/") == 1 and not name.startswith((".", "/")) else None
        if cached is None:
            raise CheckpointError(f"model {name!r} not found (not a local path, not in the local Hugging Face cache)")
        path = cached
    has_st = path.is_dir() and any(path.glob("*.safetensors"))
    if path.suffix == ".gguf" or (path.is_dir() and not has_st and any(path.glob("*.gguf"))):
        from .gguf import GGUFSource  # GGUF as a source format (dequantized on read)

        return GGUFSource(name, path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return _single_file_source(name, path)
        raise CheckpointError(f"{path}: not a model folder, .safetensors or .gguf file")
    if not has_st and allow_pickle and (any(path.glob("*.bin")) or any(path.glob("*.pt"))):
        return PickleSource(name, path)
    return FolderSource(name, path)


def _single_file_source(name: str, file: Path) -> FolderSource:
    src = FolderSource.__new__(FolderSource)
    src.name = name
    src.path = file.parent
    cfg = file.parent / "config.json"
    src.config = _read_json(cfg) if cfg.exists() else {}
    src._infos, _ = read_header(file)
    check_layer_count(name, src.config, src._infos)
    src._maps = {}
    src._lock = threading.Lock()
    return src
