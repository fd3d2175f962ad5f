"""The calibration pass: run a model on sampled windows of text and accumulate what data-aware merges need.

Forward pre-hooks on every ``nn.Linear`` add each batch's inputs to a float64 Gram
``X^T X``; Linears called on the very same input tensor in one forward (q/k/v, gate/up)
share one Gram. Token ids are counted per embedding row. Padding never enters: windows
are batched by length. With ``fisher``, each window also runs backward on its own (the
empirical Fisher is a mean of per-example squared gradients, so windows are not batched):
the gradient of the window's mean next-token loss, squared, is added per parameter.

This first version loads the whole model (``splice.hf.load_causal_lm``) and runs it as
transformers does; running it layer by layer from the shards, holding one layer and the
calibration hidden states, is a later step.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from .. import options
from ..errors import SpliceError, option
from .cache import cache_key, cache_path, cached
from .stats import GRAM_PREFIX, file_sha256, model_fingerprint, open_statistics, save_statistics
from .text import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, DEFAULT_TOKENS, read_documents, sample_windows


def check_statistics_output(out: str | os.PathLike, force: bool, inputs: list[Path]) -> Path:
    """Refuse a statistics path that is a folder, exists (unless ``force``), or is (or lies inside) an input."""
    p = options.output_file(out, "out")
    target = p.resolve()
    for inp in inputs:
        r = Path(inp).resolve()
        if target == r or r in target.parents:
            raise SpliceError(f"output {out} {'is' if target == r else 'lies inside'} the input {inp}; write the statistics elsewhere")
    if p.exists() and not force:
        raise SpliceError(f"statistics file {p} exists; pass {option('force')} to replace it")
    return p


def gram_key(members: list[str]) -> str:
    """``gram.model.layers.0.self_attn.q_proj+k_proj+v_proj`` for Linears that share one input."""
    parents = {m.rpartition(".")[0] for m in members}
    if len(parents) == 1:
        parent = parents.pop()
        leaves = "+".join(m.rpartition(".")[2] for m in members)
        return GRAM_PREFIX + (f"{parent}.{leaves}" if parent else leaves)
    return GRAM_PREFIX + "+".join(members)


class _GramHooks:
    """Forward pre-hooks that add each Linear's inputs to a Gram, one per distinct input tensor."""

    def __init__(self, model: torch.nn.Module, within: str | None = None):
        """Hooks on every Linear of ``model`` (the tied head excepted), or only on the module named ``within`` and those under it."""
        emb = model.get_input_embeddings()
        tied = emb.weight if emb is not None else None
        self.linears = [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m.weight is not tied and (within is None or n == within or n.startswith(within + "."))
        ]
        self.grams: dict[str, torch.Tensor] = {}  # first member's name -> summed Gram
        self.members: dict[str, list[str]] = {}  # first member's name -> every Linear reading that input
        self._seen: list[tuple[torch.Tensor, str]] = []  # this forward's inputs (held, so ids are not reused)
        self._grouping: dict[str, str] | None = None  # module -> group, fixed by the first forward
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.linears]

    def _hook(self, name: str):
        def f(module, args):
            x = args[0]
            group = next((g for t, g in self._seen if t is x), None)
            if self._grouping is not None:
                if self._grouping.get(name) != (group or name):
                    raise RuntimeError(f"module {name} read a different input than in the first batch; calibration needs a fixed graph")
            if group is not None:
                if self._grouping is None:
                    self.members[group].append(name)
                return
            self._seen.append((x, name))
            if self._grouping is None:
                self.members[name] = [name]
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            g = flat.T @ flat
            if name in self.grams:
                self.grams[name].add_(g)
            else:
                self.grams[name] = g

        return f

    def end_forward(self) -> None:
        self._seen.clear()
        if self._grouping is None:
            self._grouping = {m: g for g, ms in self.members.items() for m in ms}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def batches_of(wins: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """The windows in batches of equal length (longest first), so no batch needs padding."""
    by_len: dict[int, list[list[int]]] = {}
    for w in wins:
        by_len.setdefault(len(w), []).append(w)
    return [ws[i : i + batch_size] for _, ws in sorted(by_len.items(), reverse=True) for i in range(0, len(ws), batch_size)]


def grams_by_key(hooks: _GramHooks) -> dict[str, torch.Tensor]:
    """The summed Grams, keyed as the statistics file keys them."""
    return {gram_key(hooks.members[g]): gm for g, gm in hooks.grams.items()}


def calibrate(
    model,
    text: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    tokens: int = DEFAULT_TOKENS,
    seed: int = 0,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    fisher: bool = False,
    force: bool = False,
    quiet: bool = False,
    cache: str | os.PathLike | None = None,
) -> dict:
    """Measure ``model`` on ``tokens`` tokens of ``text`` and write the statistics file ``out``.

    Args:
        model: a model folder, ``.safetensors``/``.gguf`` file or cached Hugging Face id (or an open ``ModelSource``).
        text: UTF-8 text (documents separated by blank lines) or ``.jsonl`` (a ``"text"`` per record).
        out: the statistics file (safetensors; see ``splice.calibration.stats``); None: the statistics
            cache (``splice.calibration.cache``), where a file measured with the same model, text and
            settings is reused instead of measured again.
        tokens: positions to measure, drawn as windows across the documents with ``seed``.
        seq_len: window length (BOS included when the tokenizer adds one); batch_size: windows per forward.
        fisher: also measure the diagonal empirical Fisher (one forward and backward per window), for ``fisher``.
        force: replace an existing ``out``.
        quiet: no progress bar.
        cache: the cache folder when ``out`` is None (default ``splice.calibration.cache.cache_dir()``).

    Returns:
        A summary: out, tokens, windows, grams (distinct inputs), embeddings, seconds, cached (True:
        the file was already in the cache and nothing was measured).
    """
    from ..checkpoint.reader import ModelSource, open_model
    from ..eval.perplexity import adds_bos
    from ..hf import load_causal_lm

    tokens = options.positive_int(tokens, "tokens")
    seed = options.seed(seed)
    seq_len = options.integer(seq_len, "seq_len", minimum=2)
    batch_size = options.positive_int(batch_size, "batch_size")
    t0 = time.perf_counter()
    docs = read_documents(text, "text")
    text_hash = file_sha256(text)
    own = not isinstance(model, ModelSource)
    name = str(model) if own else model.name
    src = open_model(model) if own else model
    try:
        fingerprint = model_fingerprint(src)
        key = None
        if out is None:
            key = cache_key(fingerprint, text_hash, tokens=tokens, seed=seed, seq_len=seq_len, batch_size=batch_size, fisher=fisher)
            folder = Path(os.path.expanduser(cache)) if cache is not None else None
            hit = cached(key, folder)
            if hit is not None:
                st = open_statistics(hit)
                return {
                    "out": str(hit),
                    "tokens": st.tokens,
                    "windows": int(st.meta.get("windows", 0)),
                    "grams": len(set(st.inputs.values())),
                    "embeddings": len(st.embeddings),
                    "fisher": len(st.fisher),
                    "seconds": time.perf_counter() - t0,
                    "cached": True,
                }
            out_path = cache_path(key, folder)
        else:
            out_path = check_statistics_output(out, force, [Path(text), Path(src.path)])
        lm, tok = load_causal_lm(src, with_tokenizer=True)
    finally:
        if own:
            src.close()
    ctx = getattr(lm.config, "max_position_embeddings", None) or seq_len
    seq_len = min(seq_len, int(ctx))
    wins = sample_windows(tok, docs, tokens=tokens, seq_len=seq_len, seed=seed, bos=adds_bos(tok), source=str(text))
    emb = lm.get_input_embeddings()
    emb_name = next(n for n, p in lm.named_parameters() if p is emb.weight)
    counts = torch.zeros(emb.weight.shape[0], dtype=torch.float64)
    batches = batches_of(wins, 1 if fisher else batch_size)
    params = [(n, p) for n, p in lm.named_parameters() if p.is_floating_point()]
    squares = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params} if fisher else {}
    hooks = _GramHooks(lm)
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(w) for w in wins), desc=f"calibrate {name}", unit="tok", leave=False, file=sys.stderr)
    try:
        with torch.enable_grad() if fisher else torch.inference_mode():
            for b in batches:
                ids = torch.tensor(b, dtype=torch.long)
                if fisher:
                    lm.zero_grad(set_to_none=True)
                    lm(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                    for n, p in params:
                        if p.grad is not None:
                            squares[n].add_(p.grad.detach().float().square())
                else:
                    lm(input_ids=ids, use_cache=False)
                hooks.end_forward()
                counts += torch.bincount(ids.reshape(-1), minlength=counts.shape[0]).to(torch.float64)
                if bar is not None:
                    bar.update(ids.numel())
    finally:
        hooks.remove()
        if bar is not None:
            bar.close()
    measured = sum(len(w) for w in wins)
    grams = grams_by_key(hooks)
    inputs = {f"{m}.weight": gram_key(ms) for ms in hooks.members.values() for m in ms}
    from .. import __version__

    meta = {
        "tokens": str(measured),
        "seed": str(seed),
        "seq_len": str(seq_len),
        "windows": str(len(wins)),
        "model": name,
        "model_fingerprint": fingerprint,
        "text": str(text),
        "text_sha256": text_hash,
        "splice_version": __version__,
        **(key or {}),
    }
    if fisher:
        meta["fisher_windows"] = str(len(wins))
    means = {n: s / len(wins) for n, s in squares.items()}
    path = save_statistics(out_path, grams, inputs, {emb_name: counts}, meta, fisher=means)
    return {
        "out": str(path),
        "tokens": measured,
        "windows": len(wins),
        "grams": len(grams),
        "embeddings": 1,
        "fisher": len(means),
        "seconds": time.perf_counter() - t0,
        "cached": False,
    }
