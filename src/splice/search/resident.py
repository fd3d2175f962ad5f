"""One resident model whose weights each candidate overwrites in memory: no checkpoint per trial.

The base and the experts are read once and kept in memory; the model is loaded once
(from the base). A candidate recipe is planned by the same planner as ``splice merge``
and each output tensor is computed by the same job code (``engine.run.JobContext``),
from the resident tensors instead of the files, then copied into the model's parameter.
A tensor whose job (method, inputs, parameters, seed) is the same as the one the model
holds already is not recomputed, so a candidate that changes a few layers costs a few
layers. The weights are therefore exactly those ``splice merge`` writes for the recipe
(converted to the planned dtype), and the losses are splice eval's, on fixed windows.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checkpoint.reader import open_model
from ..engine.plan import RecipePlanner
from ..engine.run import JobContext, measure_sequential
from ..engine.write import torch_threads
from ..errors import CheckpointError, MergeError
from ..eval.perplexity import nll_windows
from ..recipe import load_recipe


class _Resident:
    """A model's tensors in memory, served as a ``ModelSource`` serves them (a copy the caller owns)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name].clone()


class ResidentModel:
    """The base model in memory, ready to take any candidate's (or reference model's) weights.

    Args:
        base: the base model reference; experts: the other models candidates merge.
        threads: torch threads while merging and scoring (None: torch's setting).
        batch_size: windows per forward pass.
    """

    def __init__(self, base: str, experts: list[str], *, threads: int | None = None, batch_size: int = 8):
        from ..hf import load_causal_lm

        self.threads = threads
        self.batch_size = batch_size
        self.refs = list(dict.fromkeys([base, *experts]))
        self.sources = {r: open_model(r) for r in self.refs}
        try:
            self.resident = {r: _Resident({n: s.get(n).clone() for n in s.keys()}) for r, s in self.sources.items()}
            self.model, self.tokenizer = load_causal_lm(base, with_tokenizer=True)
        except BaseException:
            self.close()
            raise
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.slots = self.model.state_dict()
        self.holds: dict[str, Any] = {}  # output tensor -> the key of the job whose result the model holds
        self.recomputed = 0  # tensors computed by the last apply()

    def close(self) -> None:
        for s in self.sources.values():
            s.close()

    def _slot(self, name: str) -> torch.Tensor:
        slot = self.slots.get(name)
        if slot is None:
            raise CheckpointError(f"tensor {name!r} of the merge has no parameter in the loaded {type(self.model).__name__}")
        return slot

    def load_reference(self, ref: str) -> None:
        """Put model ``ref``'s own weights (the base or an expert) in the resident model."""
        tensors = self.resident[ref].tensors
        with torch.no_grad():
            for name, t in tensors.items():
                if name in self.slots:
                    self.slots[name].copy_(t)
                    self.holds[name] = ("model", ref)

    def apply(self, recipe: dict | Any, seed: int = 0) -> int:
        """Put a recipe's merged weights in the resident model; returns how many tensors were recomputed.

        Raises:
            RecipeError, MergeError: the recipe is invalid, a method fails, or a tensor is not finite.
        """
        recipe = load_recipe(recipe)
        plan = measure_sequential(RecipePlanner(recipe, self.sources).build(), self.sources)
        ctx = JobContext(plan, self.resident, torch.device("cpu"), seed)
        n = 0
        with torch_threads(self.threads), torch.no_grad():
            for job in plan.jobs:
                key = _job_key(plan.method, job, seed)
                if self.holds.get(job.out_name) == key:
                    continue
                self.holds.pop(job.out_name, None)  # a failure below leaves this tensor unknown
                out = ctx.compute(job).to(job.out_dtype)
                if not job.copy and not bool(torch.isfinite(out).all()):
                    raise MergeError(f"tensor {job.out_name}: the merge is not finite (inf or nan)")
                self._slot(job.out_name).copy_(out)
                self.holds[job.out_name] = key
                n += 1
        self.recomputed = n
        return n

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The resident weights now (copies), by checkpoint tensor name."""
        return {n: t.detach().clone() for n, t in self.slots.items()}

    def losses(self, windows: dict[str, list[list[int]]], units=None) -> dict[str, float]:
        """Mean loss per domain over its windows (splice eval's loss: summed NLL / predicted tokens).

        ``units``: layers to bypass meanwhile (``splice.skip.skipping``'s skip set), or None.
        """
        from contextlib import nullcontext

        from ..skip.runtime import skipping

        out = {}
        with torch_threads(self.threads), skipping(self.model, units) if units else nullcontext():
            for d, wins in windows.items():
                res = nll_windows(self.model, wins, self.batch_size, self.pad_id)
                out[d] = sum(r[0] for r in res) / max(1, sum(r[1] for r in res))
        return out


def _job_key(method, job, seed: int) -> tuple:
    """What determines a job's output: the same key, the same tensor."""
    return (
        method.name,
        tuple((i.model, i.tensor, tuple(i.rows) if i.rows is not None else None) for i in job.inputs),
        (job.base.model, job.base.tensor) if job.base is not None else None,
        repr(sorted(job.kwargs.items())),
        seed if method.randomized else None,
        str(job.out_dtype),
        job.copy,
        job.scale,
    )
