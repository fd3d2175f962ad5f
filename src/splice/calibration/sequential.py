"""RegMean++ (``regmean`` with ``sequential: true``): each layer's Grams measured on the merged layers below it.

Plain RegMean measures every model on its own activations: the inputs of model i's layer l
come from model i's layers 0..l-1. In the merged model they come from the *merged* layers
0..l-1, so the Grams describe inputs the merged layer never sees. RegMean++ (2025)
measures layer l of model i on the merged model's hidden states
instead, in one pass from the bottom up, for each model on its own calibration windows:

    h_i = merged embeddings of model i's windows
    for l = 0 .. L-1:
        G_i = the input Grams of model i's layer l run on h_i   (one per distinct input, as usual)
        merged layer l = regmean of the models' layer l with those G_i
        h_i = merged layer l (h_i)
    the head's Gram: model i's final norm of h_i

The first-order statistics (the plain pass: which Linears share an input, token counts,
the tokens measured) come from the statistics named in the recipe, so the windows are the
same; this pass replaces their Grams with the sequential ones (in memory, never cached:
they depend on every model and on the merge's own parameters) before the merge runs. Each
merged layer is computed by the merge's own jobs, so the merge that is written is the one
the pass measured on. It loads every model (and the merged one) whole; layer-by-layer
streaming from the shards is a later step, as for the plain pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import architecture as arch
from ..errors import RecipeError
from .stats import GRAM_PREFIX, Statistics, file_sha256


@dataclass
class SequentialStatistics:
    """A model's first-order statistics whose Grams are replaced, layer by layer, by the sequential pass's."""

    first: Statistics
    grams: dict[str, torch.Tensor]  # Gram key -> summed Gram (not yet divided by the tokens)

    def __getattr__(self, name):  # path, meta, inputs, embeddings, tokens, shapes, key_for: the first-order file's
        return getattr(self.first, name)

    def load(self, key: str, rows: list[int] | None = None) -> torch.Tensor:
        if key.startswith(GRAM_PREFIX):
            if key not in self.grams:
                raise RuntimeError(f"RegMean++ has not measured {key} yet")
            return self.grams[key] / self.first.tokens
        return self.first.load(key, rows)


def is_sequential(plan) -> bool:
    return plan.method.name == "regmean" and any(j.kwargs.get("sequential") for j in plan.jobs)


def _windows(model: str, st: Statistics, tok) -> list[list[int]]:
    """The first-order pass's windows again, from the text and settings its statistics file records."""
    from ..eval.perplexity import adds_bos
    from .text import read_documents, sample_windows

    text = st.meta.get("text")
    if not text or not Path(text).is_file():
        raise RecipeError(
            f"sequential: true measures each model again on its calibration text, but the text of {model}'s statistics "
            f"({st.meta.get('text', '?')}) is not there; name it in the recipe (calibration: {{{model}: {{text: FILE}}}})"
        )
    if file_sha256(text) != st.meta.get("text_sha256"):
        raise RecipeError(f"sequential: true: calibration text {text} changed since {st.path} was measured; calibrate {model} again")
    return sample_windows(
        tok,
        read_documents(text),
        tokens=st.tokens,
        seq_len=int(st.meta["seq_len"]),
        seed=int(st.meta["seed"]),
        bos=adds_bos(tok),
        source=text,
    )


def _module_names(lm: torch.nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in lm.named_modules()}


def _layer_calls(lm: torch.nn.Module, layers: list, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """The hidden state entering the first layer, and every layer's other call arguments (masks, positions), for one batch."""
    calls: list = [None] * len(layers)
    first: list = []

    def hook(i):
        def f(module, args, kwargs):
            if i == 0:
                first.append(args[0] if args else kwargs["hidden_states"])
            calls[i] = (tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"})

        return f

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        lm(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return first[0].detach().clone(), calls


def _run_layer(layer: torch.nn.Module, h: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    out = layer(h, *call[0], **call[1])
    return out[0] if isinstance(out, tuple) else out


def _set(params: dict[str, torch.nn.Parameter], name: str, value: torch.Tensor) -> None:
    p = params.get(name)
    if p is not None:
        p.data.copy_(value.to(p.dtype).reshape(p.shape))


def sequential_statistics(plan, sources: dict, *, batch_size: int = 8):
    """The plan with each model's Grams measured RegMean++-style (see the module doc); other jobs untouched.

    Args:
        plan: a regmean plan whose statistics are the first-order ones (``RecipePlanner.build``).
        sources: the open models.
        batch_size: windows per forward.
    Returns:
        A new plan whose jobs read the sequential Grams.
    Raises:
        RecipeError: slices, a tokenizer merge, or a calibration text that is gone or changed.
    """
    from ..engine.run import JobContext
    from ..hf import load_causal_lm
    from .collect import _GramHooks, batches_of, grams_by_key

    r = plan.recipe
    if r.slices is not None or plan.layer_sources != list(range(len(plan.layer_sources))):
        raise RecipeError("sequential: true merges whole models layer by layer; it does not take slices")
    if plan.tokenizer is not None:
        raise RecipeError("sequential: true needs the models' own vocabulary (no tokenizer_source)")
    firsts: dict[str, Statistics] = {}
    for j in plan.jobs:
        for inp, (st, _) in zip(j.inputs, j.statistics or ()):
            firsts.setdefault(inp.model, st)
    seq = {m: SequentialStatistics(st, {}) for m, st in firsts.items()}
    jobs = [
        replace(j, statistics=[(seq[i.model], k) for i, (_, k) in zip(j.inputs, j.statistics)]) if j.statistics else j for j in plan.jobs
    ]
    new_plan = replace(plan, jobs=jobs)
    ctx = JobContext(new_plan, sources, torch.device("cpu"), 0)

    merged = load_causal_lm(sources[plan.reference])
    params = dict(merged.named_parameters())
    m_layers = arch.decoder_layers(merged)
    by_layer: dict[int | None, list] = {}
    for j in jobs:
        by_layer.setdefault(arch.classify(j.out_name).layer, []).append(j)
    post_names = {j.out_name for j in by_layer.get(None, []) if arch.classify(j.out_name).kind != "embed"}

    def merge_jobs(js) -> None:
        for j in js:
            _set(params, j.out_name, ctx.compute(j).to(j.out_dtype))

    with torch.no_grad():
        merge_jobs([j for j in by_layer.get(None, []) if j.out_name not in post_names])  # embeddings: token counts
        models = {}
        state = {}  # model -> [(hidden, per-layer calls)] per batch
        for m in seq:
            lm, tok = load_causal_lm(sources[m], with_tokenizer=True)
            models[m] = lm
            wins = _windows(m, firsts[m], tok)
            state[m] = []
            for b in batches_of(wins, batch_size):
                h, calls = _layer_calls(merged, m_layers, torch.tensor(b, dtype=torch.long))
                state[m].append([h, calls])
        for li in range(len(m_layers)):
            for m, lm in models.items():
                layer = arch.decoder_layers(lm)[li]
                hooks = _GramHooks(lm, within=_module_names(lm)[id(layer)])
                try:
                    for h, calls in state[m]:
                        _run_layer(layer, h, calls[li])
                        hooks.end_forward()
                finally:
                    hooks.remove()
                seq[m].grams.update(grams_by_key(hooks))
            merge_jobs(by_layer.get(li, []))
            for m in models:
                for s in state[m]:
                    s[0] = _run_layer(m_layers[li], s[0], s[1][li])
        # the head's input: each model's own final norm (its first Linear outside the layers) on the merged hidden states
        for m, lm in models.items():
            head = lm.get_output_embeddings()
            if head is None or head.weight is lm.get_input_embeddings().weight:
                continue
            hooks = _GramHooks(lm, within=_module_names(lm)[id(head)])
            norm = _final_norm(lm, params_of=post_names)
            try:
                for h, _ in state[m]:
                    head(norm(h) if norm is not None else h)
                    hooks.end_forward()
            finally:
                hooks.remove()
            seq[m].grams.update(grams_by_key(hooks))
    for m, s in seq.items():  # every Gram the first-order file has must have been measured again
        missing = sorted(set(s.first.inputs.values()) - set(s.grams))
        if missing:
            raise RecipeError(f"sequential: true could not measure {missing[0]} of {m} layer by layer")
    return new_plan


def _final_norm(lm: torch.nn.Module, params_of: set[str]):
    """The module holding the final norm's weight (a non-layer, non-embedding, non-head tensor), or None."""
    mods = dict(lm.named_modules())
    for name in sorted(params_of):
        role = arch.classify(name)
        if role.kind in ("head",):
            continue
        owner = mods.get(name.rpartition(".")[0])
        if owner is not None and not isinstance(owner, torch.nn.Linear):
            return owner
    return None
