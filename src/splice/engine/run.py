"""Run a merge plan: each job becomes one entry of the streaming writer, which computes it
(the few input tensors one output needs, loaded, merged, dropped) on its bounded pool and
writes it to its planned offset.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .. import options
from ..checkpoint.card import MERGE_RECIPE_FILE, model_card, recipe_text, resolve_chat_template
from ..checkpoint.reader import ModelSource
from ..checkpoint.side_files import SideFiles
from ..checkpoint.writer import DEFAULT_SHARD_SIZE, check_output
from ..errors import MergeError, option
from ..recipe import Recipe, load_recipe
from .plan import Input, Job, Plan, RecipePlanner, calibration_paths, open_sources
from .write import DEFAULT_MEMORY_BUDGET, Entry, torch_threads, write_checkpoint


@dataclass
class MergeOptions:
    force: bool = False
    seed: int = 0
    device: str = "cpu"
    shard_size: int | str = DEFAULT_SHARD_SIZE
    allow_pickle: bool = False
    quiet: bool = False
    workers: int | None = None  # concurrent tensor jobs; default: one per core, at least 2
    threads: int | None = None  # torch intra-op threads; default: cores / workers (CPU)
    check_finite: bool = True
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes of tensors in flight (at least the largest job)
    write_card: bool = True
    # Fix glibc's malloc thresholds for this process (faster, bounded RSS; see write._tune_malloc).
    # It changes the whole process's allocator and cannot be undone, so the library leaves
    # it off and the CLI, which owns its process, turns it on.
    tune_malloc: bool = False

    def __post_init__(self) -> None:
        """Refuse unusable values now, before any work (the checks are splice.options', shared with the CLI)."""
        options.seed(self.seed)
        options.device(self.device)
        options.size(self.shard_size, "shard_size")
        options.optional(options.positive_int, self.workers, "workers")
        options.optional(options.positive_int, self.threads, "threads")
        options.positive_int(self.memory_budget, "memory_budget")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise MergeError(f"{option('device', self.device)} was asked for but no CUDA device is available")


# ------------------------------------------------------------------ computing one output tensor


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of tensor ``name`` in a run seeded ``seed`` (independent of order and threads)."""
    h = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class JobContext:
    """What every job of one plan shares: the plan, the open models, the device, the seed."""

    plan: Plan
    sources: dict[str, ModelSource]
    device: torch.device
    seed: int

    def load(self, inp: Input, compute_dtype: torch.dtype | None) -> torch.Tensor:
        """One input tensor on the device, in ``compute_dtype`` (None: a float dtype as stored)."""
        t = self.sources[inp.model].get(inp.tensor)
        if compute_dtype is None:
            compute_dtype = t.dtype if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        if inp.rows is not None:
            idx = torch.tensor(inp.rows, dtype=torch.long)
            ok = idx >= 0
            out = torch.zeros((len(inp.rows),) + tuple(t.shape[1:]), dtype=compute_dtype, device=self.device)
            src = t.to(device=self.device, dtype=compute_dtype)
            out[ok.to(self.device)] = src[idx[ok].to(self.device)]
            return out
        return t.to(device=self.device, dtype=compute_dtype)  # the reader hands us a tensor we own

    def compute(self, job: Job) -> torch.Tensor:
        """The job's output tensor (the writer converts it to the job's dtype and checks it is finite)."""
        if job.copy:
            t = self.sources[job.inputs[0].model].get(job.inputs[0].tensor)
            return t.to(job.out_dtype) if t.dtype != job.out_dtype else t
        method = self.plan.method
        cdt = torch.float64 if job.out_dtype == torch.float64 else torch.float32
        if method.name == "passthrough" and len(job.inputs) == 1 and job.inputs[0].rows is None:
            out = self.load(job.inputs[0], cdt)
            if job.scale != 1.0:
                out.mul_(job.scale)
            return out
        # a native-dtype method upcasts as it computes: no float32 copies of the inputs
        native = method.native_dtype and cdt == torch.float32 and job.inputs[0].rows is None
        tensors = [self.load(i, None if native else cdt) for i in job.inputs]
        base = self.load(job.base, None if native else cdt) if job.base is not None else None
        if self.plan.tokenizer is not None and job.inputs[0].rows is not None:
            tensors, base = self.plan.tokenizer.fill_missing(tensors, base, job.inputs, job.base)
        kw = dict(job.kwargs)
        if job.statistics is not None:
            kw["statistics"] = [st.load(key, inp.rows).to(self.device) for (st, key), inp in zip(job.statistics, job.inputs)]
        if method.randomized:
            g = torch.Generator(device=self.device)
            g.manual_seed(tensor_seed(self.seed, job.out_name))
            kw["generator"] = g
        try:
            return method(tensors, base, **kw)
        except (ValueError, RuntimeError) as e:
            raise MergeError(f"tensor {job.out_name}: {method.name} failed: {e}") from e


def job_memory(job: Job) -> int:
    """Bytes a job holds while computing: its inputs in float32, the output and ~2 scratch tensors."""
    if job.copy:
        return job.nbytes
    n = math.prod(job.shape) * 4 * (len(job.inputs) + (job.base is not None) + 3)
    if job.statistics is not None:  # the statistics (float64), and a float64 solve: inputs, system and right-hand side
        n += sum(math.prod(st.shapes[key]) * 8 * 2 for st, key in job.statistics) + math.prod(job.shape) * 8 * (len(job.inputs) + 3)
    return n


def merge_entries(plan: Plan, sources: dict[str, ModelSource], opts: MergeOptions) -> list[Entry]:
    """The writer's entries for a plan: one per job, in plan order."""
    ctx = JobContext(plan, sources, torch.device(opts.device), opts.seed)
    return [
        Entry(j.out_name, j.out_dtype, j.shape, partial(ctx.compute, j), job_memory(j), check_finite=opts.check_finite and not j.copy)
        for j in plan.jobs
    ]


def merge_side_files(plan: Plan, sources: dict[str, ModelSource], opts: MergeOptions) -> SideFiles:
    """config.json, the tokenizer (aligned vocabulary), chat template, generation config and card of a merge."""
    from .. import __version__
    from ..tokenizer import tokenizer_model

    recipe = plan.recipe
    tok = plan.tokenizer
    card = None
    if opts.write_card:

        def card(hashes: dict[str, str], tok_files: list[str]) -> str:
            return model_card(plan, hashes, __version__, opts.seed, tok_files)

    return SideFiles(
        config=plan.config,
        model=plan.reference,
        tokenizer_dir=sources[tokenizer_model(tok, recipe, plan.reference)].tokenizer_dir(),
        added_tokens=tok.added if tok is not None and tok.mode == "union" else (),
        chat_template=resolve_chat_template(recipe.chat_template, sources),
        generation_config=sources[plan.reference].generation_config(),
        card=card,
        recipe_file=(MERGE_RECIPE_FILE, recipe_text(recipe)) if opts.write_card else None,
    )


def _threads(opts: MergeOptions) -> int | None:
    """Torch threads while writing: as asked; by default the cores' share on a CPU, and on a GPU
    (where the CPU only reads and writes) torch's setting unchanged."""
    if opts.threads is not None or torch.device(opts.device).type == "cpu":
        return opts.threads
    return torch.get_num_threads()


def measure_sequential(plan: Plan, sources: dict[str, ModelSource]) -> Plan:
    """The plan with RegMean++'s sequential Grams when it asks for them (``sequential: true``), else the plan itself."""
    from ..calibration.sequential import is_sequential, sequential_statistics

    return sequential_statistics(plan, sources) if is_sequential(plan) else plan


def _inputs(recipe: Recipe, sources: dict[str, ModelSource]) -> list[Path]:
    """Every path a merge reads: the recipe file, each model's folder (or file), LoRA adapters and statistics files."""
    calibration = calibration_paths(recipe).values()
    return [p for p in [recipe.path, *(p for s in sources.values() for p in s.input_paths()), *calibration] if p is not None]


def run_merge(recipe: Recipe | str | Path | dict, out: str | os.PathLike, opts: MergeOptions | None = None, **kw: Any) -> dict:
    """Merge ``recipe`` into the folder ``out``.

    Args:
        recipe: a recipe file, YAML text, dict or ``Recipe``.
        out: the output folder (never an input, the current or home folder; see ``check_output``).
        opts: the options; ``kw`` sets single fields of them (``force=True``, ``workers=1``, ...).

    Returns:
        A summary: out, bytes, tensors, seconds, layers, method.
    """
    opts = opts or MergeOptions()
    for k in kw:
        if not hasattr(opts, k):
            raise TypeError(f"unknown option {k!r}")
    opts = replace(opts, **kw)  # validated again, with the new values
    t0 = time.perf_counter()
    recipe = load_recipe(recipe)
    sources = open_sources(recipe, opts.allow_pickle)
    try:
        inputs = _inputs(recipe, sources)
        check_output(out, force=opts.force, inputs=inputs)  # before any work (opening read only headers)
        learned = None
        if recipe.learn is not None:  # tune the weights first; the tuned recipe is what is merged (and written beside)
            from ..calibration.learn import learn_weights

            with torch_threads(_threads(opts)):
                recipe, learned = learn_weights(recipe, sources, seed=opts.seed, device=opts.device, quiet=opts.quiet)
        plan = RecipePlanner(recipe, sources).build()
        plan = measure_sequential(plan, sources)
        for w in plan.warnings:
            print(f"warning: {w}", file=sys.stderr)
        final = write_checkpoint(
            out,
            merge_entries(plan, sources, opts),
            merge_side_files(plan, sources, opts),
            inputs=inputs,
            force=opts.force,
            shard_size=opts.shard_size,
            workers=opts.workers,
            threads=_threads(opts),
            memory_budget=opts.memory_budget,
            tune_malloc=opts.tune_malloc,
            label="merge",
            quiet=opts.quiet,
        )
    finally:
        for s in sources.values():
            s.close()
    summary = {
        "out": str(final),
        "bytes": plan.total_bytes,
        "tensors": len(plan.jobs),
        "seconds": time.perf_counter() - t0,
        "layers": len(plan.layer_sources),
        "method": plan.method.name,
    }
    if learned is not None:
        summary["learned"] = learned.as_dict()
    return summary
