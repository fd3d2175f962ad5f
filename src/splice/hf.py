"""The one place that loads a checkpoint into ``transformers``: models, tokenizers, configs.

Every load passes ``trust_remote_code=False``: a folder whose ``auto_map`` asks
transformers to run the folder's own Python code is refused with a one-line
error naming the folder and the file, and nothing of it runs. Anything
splice's reader opens loads here (a model folder, a ``.safetensors`` file, a
``.gguf`` file, a cached Hugging Face id): folders through ``from_pretrained``,
everything else as a model built from its config and filled tensor by tensor.

The transformers 4/5 difference in the dtype keyword (``torch_dtype=`` in 4.x,
``dtype=`` in 5.x) is handled here and nowhere else.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import architecture as arch
from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from .checkpoint.reader import ModelSource

# config.json keys that describe how a checkpoint was stored, not the model: dropped before building one from config.
_STORAGE_KEYS = ("torch_dtype", "dtype", "transformers_version", "quantization_config")
# Where a folder may name custom code for each kind of load (transformers reads auto_map from these).
_AUTO_MAP_FILES = {
    "AutoTokenizer": ("tokenizer_config.json", "config.json"),
    "AutoModelForCausalLM": ("config.json",),
    "AutoConfig": ("config.json",),
}


def dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """The dtype keyword of ``from_pretrained``/``from_config``: ``dtype=`` in transformers 5, ``torch_dtype=`` in 4."""
    import transformers

    major = int(transformers.__version__.split(".", 1)[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    d = getattr(torch, str(dtype), None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise CheckpointError(f"unknown dtype {dtype!r} (e.g. float32, bfloat16, float16)")
    return d


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


@contextmanager
def _no_progress_bars():
    """transformers' loading bars off for the duration (they are not splice's progress output)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------ remote code


def _json_key(path: Path, key: str):
    """``key`` of the JSON object in ``path``; None when the file, the object or the key is missing."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def _custom_code_file(folder: Path, auto_class: str) -> tuple[str, object] | None:
    """The file in ``folder`` whose ``auto_map`` names custom code for ``auto_class``, and that entry."""
    for name in _AUTO_MAP_FILES[auto_class]:
        amap = _json_key(folder / name, "auto_map")
        if isinstance(amap, dict) and auto_class in amap:
            return name, amap[auto_class]
        if isinstance(amap, (list, tuple)) and auto_class == "AutoTokenizer":  # the old tokenizer_config format
            return name, amap
    return None


def _refusal(folder: Path, name: str, entry: object, what: str) -> CheckpointError:
    return CheckpointError(
        f"{folder / name}: the {what} needs the folder's own Python code (auto_map {entry!r}); splice never runs a model's code"
    )


def _check_tokenizer_class(folder: Path) -> None:
    """Refuse a folder whose tokenizer class exists only in the folder's own code.

    With ``trust_remote_code=False`` transformers would not run that code, but for
    some model types it falls back to a built-in tokenizer, which may not split
    text as the folder's own would: a silently different tokenizer. A class that
    transformers has (named beside a leftover ``auto_map``) loads as usual.
    """
    custom = _custom_code_file(folder, "AutoTokenizer")
    if custom is None:
        return
    import transformers

    cls = _json_key(folder / "tokenizer_config.json", "tokenizer_class")
    if not isinstance(cls, str) or not hasattr(transformers, cls):
        raise _refusal(folder, *custom, "tokenizer")


def _check_model_type(folder: Path) -> None:
    """Refuse a folder whose model type exists only in the folder's own code (its config.json names that code)."""
    custom = _custom_code_file(folder, "AutoModelForCausalLM") or _custom_code_file(folder, "AutoConfig")
    if custom is None:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = _json_key(folder / "config.json", "model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise _refusal(folder, *custom, "model")


def _load_error(folder: Path, auto_class: str, what: str, e: Exception) -> CheckpointError:
    """A one-line error for a failed transformers load; a refusal of custom code says which file asked for it."""
    custom = _custom_code_file(folder, auto_class)
    if custom is not None and "trust_remote_code" in str(e):
        return _refusal(folder, *custom, what)
    return CheckpointError(f"{folder}: transformers cannot load the {what} ({_first_line(e)})")


# ------------------------------------------------------------------ tokenizers


def load_tokenizer(folder: str | os.PathLike, **kwargs: Any):
    """The tokenizer in ``folder``, loaded by ``AutoTokenizer`` without remote code.

    Args:
        folder: a folder holding tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...).
        **kwargs: passed to ``AutoTokenizer.from_pretrained`` (e.g. ``gguf_file``).

    Returns:
        The tokenizer. Any failure (custom code asked for, unreadable files) is a one-line ``CheckpointError``.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    _check_tokenizer_class(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the files are unusable
        raise _load_error(folder, "AutoTokenizer", "tokenizer", e) from None


def source_tokenizer(src: ModelSource, why: str | None = None):
    """The tokenizer of an open model source (its folder's files, or the one embedded in a GGUF file).

    Args:
        src: an open ``ModelSource``.
        why: what needs it, for the error when the model has none (e.g. ``"calibration needs it"``).
    """
    folder = src.tokenizer_dir()
    if folder is None:
        raise CheckpointError(f"model {src.name}: no tokenizer files found" + (f" ({why})" if why else ""))
    return load_tokenizer(folder)


# ------------------------------------------------------------------ configs and models


def config_from_dict(config: dict, name: str):
    """A ``transformers`` config object from a ``config.json`` dict (storage keys dropped; no code runs).

    Args:
        config: the model's config as a dict (``ModelSource.config``).
        name: the model, for error messages.
    """
    from transformers import AutoConfig

    cfg = {k: v for k, v in config.items() if k not in _STORAGE_KEYS}
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise CheckpointError(f"model {name}: config has no model_type; transformers cannot build it")
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"model {name}: transformers cannot build a {model_type!r} model ({_first_line(e)})") from None


def _from_pretrained_folder(src: ModelSource) -> Path | None:
    """The folder ``from_pretrained`` loads exactly this source from, or None (build from config and fill instead).

    That is a safetensors folder with a ``config.json`` whose standard weight files
    (``model.safetensors`` or the index's shards) are the source's files: not a GGUF
    or pickle source, nor one ``.safetensors`` file lying beside others.
    """
    from .checkpoint.reader import FolderSource

    folder = Path(src.path)
    if type(src) is not FolderSource or not (folder / "config.json").is_file():
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _json_key(index, "weight_map")
        if not isinstance(weight_map, dict):
            return None
        expected = {(folder / str(f)).resolve() for f in weight_map.values()}
    else:
        expected = {(folder / "model.safetensors").resolve()}
    files = {Path(src.info(k).file).resolve() for k in src.keys()}
    return folder if files == expected else None


def _pretrained(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False, use_safetensors=True, **dtype_kwargs(dtype))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise _load_error(folder, "AutoModelForCausalLM", "model", e) from None


def _filled_from_source(src: ModelSource, dtype: torch.dtype):
    """A model built from ``src.config``, its parameters copied from ``src`` one tensor at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    config = config_from_dict(src.config, src.name)
    try:
        model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(dtype))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"model {src.name}: transformers cannot build a {config.model_type!r} model ({_first_line(e)})") from None
    slots = model.state_dict()  # shares storage with the parameters (tied weights share one slot)
    loaded = set()
    with torch.no_grad():
        for name in src.keys():
            slot = slots.get(name)
            if slot is None:
                if name.endswith(arch.COMPUTED_TENSOR_SUFFIXES):
                    continue
                raise CheckpointError(f"model {src.name}: tensor {name!r} is not part of a {config.model_type!r} model")
            t = src.get(name)
            if tuple(t.shape) != tuple(slot.shape):
                raise CheckpointError(
                    f"model {src.name}: tensor {name!r} has shape {list(t.shape)}, a {config.model_type!r} model expects {list(slot.shape)}"
                )
            slot.copy_(t)
            loaded.add(name)
    missing = [n for n, _ in model.named_parameters() if n not in loaded]  # a tied head is listed once, as the embedding
    if missing:
        raise CheckpointError(f"model {src.name}: tensor {missing[0]!r} missing for a {config.model_type!r} model")
    return model


def load_causal_lm(
    ref: str | os.PathLike | ModelSource,
    *,
    dtype: str | torch.dtype = "float32",
    with_tokenizer: bool = False,
    tokenizer: str | os.PathLike | None = None,
    bypass_zero_mlps: bool = False,
):
    """A ``transformers`` causal LM (eval mode) for anything splice's reader opens.

    Args:
        ref: a model folder, a ``.safetensors`` or ``.gguf`` file, a cached Hugging Face id, or an
            open ``ModelSource`` (left open: the caller owns it).
        dtype: the parameters' dtype (``"float32"``, ``torch.bfloat16``, ...).
        with_tokenizer: also return the model's tokenizer (its folder's files, a GGUF's embedded one,
            or ``tokenizer``); loaded first, so a missing or refused tokenizer fails before the weights load.
        tokenizer: a folder to take the tokenizer from instead of the model's.
        bypass_zero_mlps: bypass at run time the MLP blocks whose output projection is all zeros
            (how ``splice skip --strategy ffn`` writes dropped blocks), so they cost nothing.

    Returns:
        The model, or ``(model, tokenizer)`` with ``with_tokenizer``.
    """
    from .checkpoint.reader import ModelSource, open_model

    torch_dtype = _torch_dtype(dtype)
    own = not isinstance(ref, ModelSource)
    src = open_model(ref) if own else ref
    try:
        tok = None
        if with_tokenizer:
            tok = load_tokenizer(tokenizer) if tokenizer is not None else source_tokenizer(src)
        if Path(src.path).is_dir():
            _check_model_type(Path(src.path))
        folder = _from_pretrained_folder(src)
        with _no_progress_bars():
            model = _pretrained(folder, torch_dtype) if folder is not None else _filled_from_source(src, torch_dtype)
    finally:
        if own:
            src.close()
    model.eval()
    if bypass_zero_mlps:
        from .skip.runtime import bypass_zero_mlps as bypass

        bypass(model)
    return (model, tok) if with_tokenizer else model
