"""The calibration statistics file: what ``splice calibrate`` writes and data-aware merges read.

A safetensors file of float64 tensors, keyed by what was measured:

- ``gram.<module>``: the input Gram ``X^T X`` ([in, in]) summed over the calibration
  tokens, once per distinct input. Linears that read the same input share one Gram
  (q/k/v: ``gram.model.layers.0.self_attn.q_proj+k_proj+v_proj``; gate/up likewise).
- ``tokens.<embedding weight>``: how often each row was looked up ([rows]).
- ``fisher.<parameter>`` (``splice calibrate --fisher``): the diagonal empirical Fisher, the
  squared gradient of each window's mean next-token loss, averaged over the windows
  (float32, the parameter's shape).

Its ``__metadata__`` says what the numbers belong to: ``format`` (``FORMAT``), ``inputs``
(JSON: each Linear weight's name -> its Gram's key), ``embeddings`` (JSON: embedding weight
-> counts key), ``fisher`` (JSON: parameter -> Fisher key; with ``fisher_windows``), ``tokens`` (positions measured), ``seed``, ``seq_len``, the model
(``model``, ``model_fingerprint``) and the text (``text``, ``text_sha256``).

Readers divide Grams and counts by ``tokens`` (``Statistics.load``): a Gram per token, token
frequencies, so files measured on different budgets weigh alike in a merge; the Fisher is
stored as a mean already.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.reader import ModelSource
from ..checkpoint.safetensors_io import TensorFile, read_header
from ..errors import CheckpointError

FORMAT = "splice-calibration-1"
GRAM_PREFIX = "gram."
TOKENS_PREFIX = "tokens."
FISHER_PREFIX = "fisher."
# Bytes read from the start of each tensor for a model's fingerprint: enough to tell a
# fine-tune from its base (a fine-tune changes every tensor's first values), little enough
# that checking a merge's statistics against its models reads kilobytes, not the models.
FINGERPRINT_BYTES = 256


def model_fingerprint(src: ModelSource) -> str:
    """A sha256 over every tensor's name, dtype, shape and first ``FINGERPRINT_BYTES`` bytes.

    Not a hash of the whole files (that would read the whole model for every merge): it
    tells models apart that differ in any tensor's first values, which fine-tunes,
    merges and dtype conversions do.
    """
    h = hashlib.sha256()
    for name in sorted(src.keys()):
        info = src.info(name)
        h.update(f"{name}\x00{str(info.dtype)}\x00{list(info.shape)}\x00".encode())
        file = getattr(info, "file", None)
        if file is not None and str(file).endswith(".safetensors"):
            with open(file, "rb") as f:
                f.seek(info.start)
                h.update(f.read(min(FINGERPRINT_BYTES, info.end - info.start)))
        else:  # GGUF or pickle sources: the tensor as the reader gives it
            t = src.get(name).reshape(-1)
            h.update(t[: max(1, FINGERPRINT_BYTES // t.element_size())].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Statistics:
    """An open statistics file (headers only; ``load`` reads one tensor).

    Attributes:
        path: the file.
        meta: its metadata (strings), as written.
        inputs: Linear weight name -> Gram key.
        embeddings: embedding weight name -> token-counts key.
        fisher: parameter name -> Fisher key (empty unless calibrated with ``fisher``).
        tokens: positions measured.
        shapes: key -> shape.
    """

    path: Path
    meta: dict[str, str]
    inputs: dict[str, str]
    embeddings: dict[str, str]
    fisher: dict[str, str]
    tokens: int
    shapes: dict[str, tuple[int, ...]]
    _infos: dict

    def key_for(self, weight: str, kind: str = "inputs") -> str | None:
        """The key of ``weight``'s statistics of ``kind`` ("inputs": a Gram or token counts; "fisher"), or None."""
        if kind == "fisher":
            return self.fisher.get(weight)
        return self.inputs.get(weight) or self.embeddings.get(weight)

    def load(self, key: str, rows: list[int] | None = None) -> torch.Tensor:
        """Tensor ``key`` in float64, divided by the tokens measured; ``rows`` permutes token counts (-1: 0)."""
        f = TensorFile(self.path)
        try:
            t = f.tensor(self._infos[key]).to(torch.float64)
        finally:
            f.close()
        if not key.startswith(FISHER_PREFIX):
            t /= self.tokens
        if rows is not None and t.dim() == 1:
            idx = torch.tensor(rows, dtype=torch.long)
            out = torch.zeros(len(rows), dtype=torch.float64)
            ok = idx >= 0
            out[ok] = t[idx[ok]]
            t = out
        return t


def open_statistics(path: str | os.PathLike) -> Statistics:
    """Open a statistics file written by ``splice calibrate``; a one-line error if it is not one."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"statistics file {p} not found (splice calibrate writes one)")
    infos, meta = read_header(p)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a splice statistics file (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        inputs = json.loads(meta["inputs"])
        embeddings = json.loads(meta.get("embeddings", "{}"))
        fisher = json.loads(meta.get("fisher", "{}"))
        tokens = int(meta["tokens"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{p}: corrupted statistics metadata ({e})") from None
    missing = [k for k in (*inputs.values(), *embeddings.values(), *fisher.values()) if k not in infos]
    if missing or tokens <= 0:
        raise CheckpointError(f"{p}: corrupted statistics file ({'no tensor ' + missing[0] if missing else 'no tokens measured'})")
    return Statistics(p, meta, inputs, embeddings, fisher, tokens, {k: tuple(i.shape) for k, i in infos.items()}, infos)


def save_statistics(
    path: str | os.PathLike,
    grams: dict[str, torch.Tensor],
    inputs: dict[str, str],
    counts: dict[str, torch.Tensor],
    meta: dict[str, str],
    fisher: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a statistics file atomically (a temporary file renamed into place).

    Args:
        path: the file (refusing an existing one is the caller's decision).
        grams: Gram key (``gram.*``) -> summed Gram; inputs: Linear weight -> Gram key.
        counts: embedding weight -> token counts (stored as ``tokens.<weight>``).
        meta: ``tokens`` and the provenance (model, fingerprint, text, seed, ...).
        fisher: parameter -> mean squared gradient (stored as float32, ``fisher.<parameter>``).
    """
    from ..checkpoint.atomic import write_atomic
    from ..checkpoint.safetensors_io import plan_layout, tensor_bytes

    tensors = {k: v.to(torch.float64).contiguous() for k, v in grams.items()}
    embeddings = {}
    for weight, c in counts.items():
        embeddings[weight] = TOKENS_PREFIX + weight
        tensors[TOKENS_PREFIX + weight] = c.to(torch.float64).contiguous()
    fisher_keys = {}
    for name, f in (fisher or {}).items():
        fisher_keys[name] = FISHER_PREFIX + name
        tensors[FISHER_PREFIX + name] = f.to(torch.float32).contiguous()
    full = {
        **{k: str(v) for k, v in meta.items()},
        "format": FORMAT,
        "inputs": json.dumps(inputs, sort_keys=True),
        "embeddings": json.dumps(embeddings, sort_keys=True),
        **({"fisher": json.dumps(fisher_keys, sort_keys=True)} if fisher_keys else {}),
    }
    names = sorted(tensors)  # splice's own layout: the same statistics give the same bytes
    header, _ = plan_layout([(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in names], dict(sorted(full.items())))

    def write(f) -> None:
        f.write(header)
        for k in names:
            f.write(tensor_bytes(tensors[k]))

    return write_atomic(path, write)
