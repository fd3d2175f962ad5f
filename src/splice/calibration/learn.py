"""Learned merge weights (AdaMerging for causal LMs): tune a task-vector merge's per-model weights on calibration text.

AdaMerging (Yang et al. 2024, arXiv:2310.02575) learns the coefficients of a task-arithmetic
or TIES merge, one per task ("task-wise") or one per task and layer ("layer-wise"), by
gradient descent on unlabelled data (the entropy of the merged classifier's predictions).
A causal LM has a label-free objective of its own, next-token loss, so here the weights are
tuned on next-token loss of each expert's calibration text (the recipe's ``calibration:``
entries), averaged over the experts.

The tuned model is the recipe's own merge with other weights: for the task-vector family
(``methods.task_arithmetic``) the sparsified task vectors do not depend on the weights
(TIES's trim, DARE's and DELLA's drops, Breadcrumbs' window are per model), so they are
computed once, by the method itself with one model weighted at a time, and the merged
tensor is a cheap function of the weights: ``base + lambda * sum_i w_i a_i d_i / divisor``,
where the sign election ``a_i`` (and the TIES divisor's support) is piecewise constant in
the weights and is recomputed from the current weights at every step without a gradient.
Each evaluation of the objective (L-BFGS makes one to a few per iteration) (i) puts the
merge at the current weights into the base model, (ii) runs forward and backward on every
expert's training windows for the gradient of the loss with respect to each merged
tensor, and (iii) carries it to the weights tensor by tensor
(memory: the model, its gradients and the task vectors, never a graph of the whole merge).

The objective (``objective: normalized``, the default) is splice eval's normalized score on
the calibration text: each expert's loss term is divided by that expert's own gain over the
base on its text, so every domain counts by the share of its gain the merge keeps, not by the
size of its losses (a plain mean of losses, ``objective: loss``, lets the domain with the
largest gain take the weights). A share of each expert's windows (``holdout``) is held out;
the objective is measured there at the start and every ``eval_every`` steps, and the weights
that score best are the result, so the tuned weights are never worse than the recipe's on
held-out calibration text.

The result is an ordinary recipe: the same method, models and parameters, each expert's
``weight`` replaced by the learned value (task-wise) or by one ``{filter, value}`` entry per
layer plus one for the tensors outside the layers (layer-wise); ``splice merge`` of that
recipe writes exactly the model that was tuned.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import architecture as arch
from ..errors import MergeError, SpliceError
from .text import DEFAULT_SEQ_LEN, DEFAULT_TOKENS, read_documents, sample_windows

GRANULARITIES = ("task", "layer")
DEFAULT_GRANULARITY = "layer"
DEFAULT_STEPS = 10  # L-BFGS iterations; each costs one or a few forward-backward passes over every training window
DEFAULT_BATCH = 8  # windows per forward pass: more is faster, and holds more activations
LBFGS_HISTORY = 10  # curvature pairs L-BFGS keeps: as many as the iterations it usually runs
DEFAULT_HOLDOUT = 0.125  # share of each expert's windows kept aside to choose the best weights
DEFAULT_EVAL_EVERY = 10  # steps between held-out measurements (and at the start and the end)
OBJECTIVES = ("normalized", "loss")
DEFAULT_OBJECTIVE = "normalized"  # each expert's loss scaled by its gain over the base: splice eval's normalized score
GAIN_EPS = 1e-6  # nats: an expert whose loss is not this much below the base's on its own text has no gain to keep
SCALE_WINDOWS = 16  # without held-out windows, the training windows that measure each model's loss
LEARN_KEYS = ("weights", "steps", "batch_size", "holdout", "eval_every", "objective")
OTHER = "other"  # the group of tensors outside the layers (embeddings, final norm, output head)


@dataclass(frozen=True)
class LearnSpec:
    """The recipe's ``learn:`` mapping, validated."""

    weights: str = DEFAULT_GRANULARITY
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH
    holdout: float = DEFAULT_HOLDOUT
    eval_every: int = DEFAULT_EVAL_EVERY
    objective: str = DEFAULT_OBJECTIVE


@dataclass
class LearnReport:
    """What the tuning did: weights per model (per group), held-out losses, seconds."""

    weights: dict[str, dict[str, float]]  # model -> group (layer index as text, or "other"; "all" task-wise) -> weight
    start_weights: dict[str, dict[str, float]]
    objective: str  # "normalized" or "loss"
    scores: list[tuple[int, float]]  # (step, the objective on the held-out windows: higher is better)
    best_step: int
    seconds: float
    steps: int
    trace: list[float] = field(default_factory=list)  # training loss per step

    def as_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "start_weights": self.start_weights,
            "objective": self.objective,
            "scores": [{"step": s, "score": round(v, 6)} for s, v in self.scores],
            "best_step": self.best_step,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
        }


def family_value(
    deltas: torch.Tensor, base: torch.Tensor, w: torch.Tensor, *, consensus: bool, normalize: bool, lambda_: float
) -> torch.Tensor:
    """The task-vector family's merge of one tensor, differentiable in the weights ``w`` (one per model).

    ``deltas`` stacks the models' sparsified task vectors (K x shape). The TIES election
    (the sign of the weighted sum, zero counting as positive; a model takes part where its
    weighted delta has that sign) is taken from ``w`` without a gradient: it is piecewise
    constant in ``w``. Elements where no model takes part keep the base (divisor 1).
    """
    wv = w.view(-1, *([1] * base.dim()))
    wd = wv * deltas
    if consensus:
        with torch.no_grad():
            positive = wd.sum(0) >= 0
            agree = torch.where(positive, wd > 0, wd < 0).to(deltas.dtype)
        merged = (wd * agree).sum(0)
        if normalize:
            div = (wv * agree).sum(0)
            merged = merged / torch.where(div == 0, torch.ones_like(div), div)
    else:
        merged = wd.sum(0)
        if normalize:
            merged = merged / w.sum()
    return base + lambda_ * merged


class _TensorTerm:
    """One merged tensor's pieces: base, stacked sparsified task vectors, its weight group, the method's switches."""

    __slots__ = ("name", "base", "deltas", "group", "consensus", "normalize", "lambda_", "models", "load")

    def __init__(self, name, base, deltas, group, consensus, normalize, lambda_, models, load):
        self.name, self.base, self.deltas, self.group = name, base, deltas, group
        self.consensus, self.normalize, self.lambda_, self.models = consensus, normalize, lambda_, models
        self.load = load  # model reference -> that model's own tensor (float32)

    def deltas_raw(self, model: str) -> torch.Tensor:
        """Model ``model``'s whole task vector (not sparsified): its own tensor minus the base."""
        return self.load(model) - self.base


def _variant(method_name: str):
    from ..methods.task_arithmetic import FAMILY

    for v in FAMILY:
        if v.name == method_name:
            return v
    raise MergeError(f"learned weights need a task-vector method ({', '.join(v.name for v in FAMILY)}), not {method_name!r}")


def sparsified_deltas(
    tensors: list[torch.Tensor], base: torch.Tensor, *, sparsification: str | None, generator=None, **kw: Any
) -> torch.Tensor:
    """Each model's sparsified task vector (K x shape, float32), computed by the family's own code one model at a time.

    Model i's is the merge with weight 1 on model i and 0 on the others, no election, no
    normalization, minus the base. ``generator()`` returns a fresh generator seeded as the
    merge seeds it (or None): DARE and DELLA then draw the very drops the merge draws.
    ``kw``: the method's density, rescale, gamma or epsilon.
    """
    from ..methods.task_arithmetic import merge_family

    out = torch.empty((len(tensors), *base.shape), dtype=torch.float32, device=base.device)
    for i in range(len(tensors)):
        one = [1.0 if j == i else 0.0 for j in range(len(tensors))]
        merged = merge_family(
            tensors,
            base,
            sparsification=sparsification,
            consensus=False,
            weight=one,
            normalize=False,
            lambda_=1.0,
            generator=generator() if generator is not None else None,
            **kw,
        )
        torch.sub(merged, base.to(torch.float32), out=out[i])
    return out


def _sparsified(job, ctx, variant, device) -> torch.Tensor:
    """The job's models' sparsified task vectors, with the job's parameters and the merge's random stream."""
    from ..engine.run import tensor_seed

    def generator():
        g = torch.Generator(device=device)
        g.manual_seed(tensor_seed(ctx.seed, job.out_name))
        return g

    tensors = [ctx.load(i, torch.float32) for i in job.inputs]
    base = ctx.load(job.base, torch.float32)
    kw = {k: v for k, v in job.kwargs.items() if k in ("density", "rescale", "gamma", "epsilon")}
    randomized = variant.sparsification in ("random", "della_magprune")
    return sparsified_deltas(tensors, base, sparsification=variant.sparsification, generator=generator if randomized else None, **kw)


def _layer_filters(names_by_group: dict[str, list[str]], all_names: list[str]) -> dict[str, str]:
    """Per layer group, the name prefix of its tensors (``model.layers.3.``), checked to match no other tensor."""
    out = {}
    for g, names in names_by_group.items():
        if g == OTHER:
            continue
        role = arch.classify(names[0])
        flt = f"{role.prefix}.{role.layer}."
        inside = set(names)
        if any(flt in n for n in all_names if n not in inside) or not all(flt in n for n in names):
            raise MergeError(f"cannot name layer {g} by a tensor-name filter: {flt!r} does not single out its tensors")
        out[g] = flt
    return out


def _windows(tokenizer, spec: dict, model: str, recipe) -> list[list[int]]:
    from ..engine.plan import _recipe_path
    from ..eval.perplexity import adds_bos

    text = _recipe_path(recipe, spec["text"])
    docs = read_documents(text, f"calibration text of {model}")
    return sample_windows(
        tokenizer,
        docs,
        tokens=spec.get("tokens", DEFAULT_TOKENS),
        seq_len=spec.get("seq_len", DEFAULT_SEQ_LEN),
        seed=spec.get("seed", 0),
        bos=adds_bos(tokenizer),
        source=str(text),
    )


def _mean_loss(model, wins: list[list[int]], pad_id: int, batch: int, device) -> float:
    """Mean next-token loss over the windows (summed NLL / predicted tokens), no gradient."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(wins), batch):
            chunk = wins[b : b + batch]
            n = sum(len(x) - 1 for x in chunk)
            nll += float(_batch_loss(model, chunk, pad_id, device)) * n
            count += n
    return nll / max(1, count)


def _batch_loss(model, wins: list[list[int]], pad_id: int, device) -> torch.Tensor:
    import torch.nn.functional as F

    from ..eval.perplexity import padded_batch

    ids, mask = padded_batch(wins, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    lp = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:].to(lp.dtype)
    return (lp * m).sum() / m.sum().clamp(min=1)


def learn_weights(recipe, sources, *, seed: int = 0, device: str = "cpu", quiet: bool = True):
    """Tune the recipe's per-model weights on its calibration text; returns (the tuned Recipe, a LearnReport).

    Args:
        recipe: a validated Recipe with ``learn`` set (a task-vector method, ``models:``, a base,
            ``calibration:`` text entries for the experts whose text drives the loss).
        sources: the open models (``engine.plan.open_sources``).
        seed: the merge's seed (DARE and DELLA draw their drops from it, as the final merge will).
        device: where the model and task vectors live while tuning.
        quiet: no progress lines on stderr.

    Raises:
        MergeError / SpliceError: a method outside the family, a tensor the model has no parameter
            for, missing or too-short calibration text, a non-finite loss.
    """
    from ..engine.plan import RecipePlanner
    from ..engine.run import JobContext
    from ..hf import load_causal_lm
    from ..recipe import parse_recipe

    spec: LearnSpec = recipe.learn
    variant = _variant(recipe.merge_method)
    dev = torch.device(device)
    t0 = time.perf_counter()
    plan = RecipePlanner(recipe, sources).build()
    ctx = JobContext(plan, sources, dev, seed)
    experts = [m.model for m in recipe.models if m.model != recipe.base_model]
    texts = {m: recipe.calibration[m] for m in experts if m in recipe.calibration}

    model, tokenizer = load_causal_lm(sources[recipe.base_model], dtype="float32", with_tokenizer=True)
    model.to(dev)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    params = dict(model.named_parameters(remove_duplicate=False))
    for p in params.values():
        p.requires_grad_(False)

    # the merged tensors' pieces, grouped (task-wise: one group; layer-wise: per layer, plus "other")
    terms: list[_TensorTerm] = []
    names_by_group: dict[str, list[str]] = {}
    order: list[str] = []  # model order of every job (the same in all jobs of a models: recipe)
    for job in plan.jobs:
        if job.copy:
            continue
        if job.out_name not in params:
            raise MergeError(f"tensor {job.out_name!r} of the merge has no parameter in the loaded {type(model).__name__}")
        if job.inputs and job.inputs[0].rows is not None:
            raise MergeError("learned weights do not support a tokenizer that reorders embedding rows yet")
        models = [i.model for i in job.inputs]
        order = order or models
        if models != order:
            raise MergeError(f"tensor {job.out_name}: its models differ from the other tensors'; learned weights need one model list")
        layer = arch.classify(job.out_name).layer if spec.weights == "layer" else None
        group = "all" if spec.weights == "task" else (OTHER if layer is None else str(layer))
        names_by_group.setdefault(group, []).append(job.out_name)
        kw = job.kwargs
        terms.append(
            _TensorTerm(
                job.out_name,
                ctx.load(job.base, torch.float32),
                _sparsified(job, ctx, variant, dev),
                group,
                variant.consensus,
                bool(kw.get("normalize", variant.normalize)),
                float(kw.get("lambda_", 1.0)),
                [float(x) for x in kw["weight"]],
                lambda m, job=job: ctx.load(job.inputs[[i.model for i in job.inputs].index(m)], torch.float32),
            )
        )
        params[job.out_name].requires_grad_(True)
    if not terms:
        raise MergeError("the recipe merges no tensor whose weights could be learned")
    groups = list(dict.fromkeys(t.group for t in terms))
    gi = {g: i for i, g in enumerate(groups)}
    start = torch.zeros(len(order), len(groups), dtype=torch.float64)
    counts = torch.zeros(len(groups))
    for t in terms:
        start[:, gi[t.group]] += torch.tensor(t.models, dtype=torch.float64)
        counts[gi[t.group]] += 1
    start /= counts.to(torch.float64)
    w = start.clone().to(torch.float32).to(dev).requires_grad_(True)

    # calibration windows: each expert's own text, a held-out share set aside
    train, held = {}, {}
    for m, text_spec in texts.items():
        wins = _windows(tokenizer, text_spec, m, recipe)
        n_held = max(1, int(round(len(wins) * spec.holdout))) if spec.holdout > 0 else 0
        if len(wins) - n_held < 1:
            raise SpliceError(f"calibration text of {m} gives {len(wins)} window(s): too few to hold {spec.holdout:g} of them out")
        held[m], train[m] = wins[:n_held], wins[n_held:]

    def measure(m: str) -> float:
        """Model ``m``'s loss on the windows that measure it: the held-out ones (the first training ones without)."""
        return _mean_loss(model, held[m] or train[m][:SCALE_WINDOWS], pad_id, spec.batch_size, dev)

    # each expert's loss term is scaled by its own gain over the base on its text, so the
    # objective is splice eval's normalized score (the share of each expert's gain kept) on
    # the calibration text, not a mean dominated by the domain with the largest losses
    scale = {m: 1.0 for m in train}
    base_loss = {m: measure(m) for m in train}  # the model holds the base's weights still
    if spec.objective == "normalized":
        for m in train:
            with torch.no_grad():
                for t in terms:
                    params[t.name].copy_(t.base + t.deltas_raw(m))
            gain = base_loss[m] - measure(m)
            if not gain > GAIN_EPS:
                raise MergeError(
                    f"expert {m} is not better than the base on its calibration text (gain {gain:.4g} nats): the normalized "
                    "objective needs a gain; give the expert's own text, or set learn: {objective: loss}"
                )
            scale[m] = 1.0 / gain

    def put(weights: torch.Tensor) -> None:
        with torch.no_grad():
            for t in terms:
                v = family_value(t.deltas, t.base, weights[:, gi[t.group]], consensus=t.consensus, normalize=t.normalize, lambda_=t.lambda_)
                params[t.name].copy_(v)

    def score() -> float:
        """The objective on the measuring windows, higher is better: mean normalized score, or minus the mean loss."""
        if spec.objective == "normalized":
            return sum((base_loss[m] - measure(m)) * scale[m] for m in train) / len(train)
        return -sum(measure(m) for m in train) / len(train)

    # L-BFGS on the whole training set: the objective is deterministic (no batch noise) and
    # sharply curved in the weights (a task-vector scale a little too large ruins a merge),
    # which a line search follows where a fixed step size overshoots
    evals = 0

    def objective() -> torch.Tensor:
        nonlocal evals
        evals += 1
        put(w.detach())
        for p in params.values():
            p.grad = None
        total = 0.0
        for m, wins in train.items():
            n_tok = sum(len(x) - 1 for x in wins)
            for b in range(0, len(wins), spec.batch_size):
                chunk = wins[b : b + spec.batch_size]
                share = sum(len(x) - 1 for x in chunk) / n_tok
                loss = _batch_loss(model, chunk, pad_id, dev) * (share * scale[m] / len(train))
                if not torch.isfinite(loss):
                    raise MergeError(f"learning the weights: the loss on {m}'s calibration text is not finite")
                loss.backward()
                total += float(loss.detach())
        w.grad = None
        for t in terms:
            g = params[t.name].grad
            if g is not None:
                family_value(t.deltas, t.base, w[:, gi[t.group]], consensus=t.consensus, normalize=t.normalize, lambda_=t.lambda_).backward(
                    g
                )
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        if not bool(torch.isfinite(w.grad).all()):
            raise MergeError("learning the weights: the gradient is not finite")
        return torch.tensor(total)

    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=1, history_size=LBFGS_HISTORY, line_search_fn="strong_wolfe")
    put(w.detach())
    best = (score(), 0, w.detach().clone())
    scores = [(0, best[0])]
    trace = []
    for step in range(1, spec.steps + 1):
        trace.append(float(opt.step(objective)))
        put(w.detach())
        if step % spec.eval_every == 0 or step == spec.steps:
            sc = score()
            scores.append((step, sc))
            if sc > best[0] or not any(held.values()):  # without held-out windows: the last weights
                best = (sc, step, w.detach().clone())
        if not quiet:
            print(
                f"learn: step {step}/{spec.steps}  train objective {trace[-1]:.4f}  {spec.objective} {scores[-1][1]:.4f}", file=sys.stderr
            )
    final = best[2]
    if not bool(torch.isfinite(final).all()):
        raise MergeError("learning the weights gave non-finite weights")

    def table(x: torch.Tensor) -> dict[str, dict[str, float]]:
        return {m: {g: round(float(x[i, gi[g]]), 6) for g in groups} for i, m in enumerate(order)}

    learned = table(final.to(torch.float64).cpu())
    raw = learned_recipe_raw(recipe, learned, _layer_filters(names_by_group, [t.name for t in terms]) if spec.weights == "layer" else {})
    tuned = parse_recipe(raw)
    tuned.path, tuned.derived = recipe.path, True
    report = LearnReport(learned, table(start), spec.objective, scores, best[1], time.perf_counter() - t0, spec.steps, trace)
    return tuned, report


def learned_recipe_raw(recipe, learned: dict[str, dict[str, float]], filters: dict[str, str]) -> dict:
    """The recipe's YAML data with each expert's ``weight`` set to its learned value(s); no ``learn:`` or ``calibration:``."""
    raw = copy.deepcopy(recipe.raw)
    raw.pop("learn", None)
    raw.pop("calibration", None)
    entries = raw["models"]
    for i, src in enumerate(recipe.models):
        if src.model not in learned:
            continue
        e = entries[i]
        if isinstance(e, str):
            e = entries[i] = {"model": e}
        params = dict(e.get("parameters") or {})
        vals = learned[src.model]
        if "all" in vals:
            params["weight"] = vals["all"]
        else:
            rows = [{"filter": filters[g], "value": v} for g, v in vals.items() if g != OTHER]
            if OTHER in vals:
                rows.append({"value": vals[OTHER]})
            params["weight"] = rows
        e["parameters"] = params
    for v in learned.values():
        for x in v.values():
            if not math.isfinite(x):
                raise MergeError("a learned weight is not finite")
    return raw
