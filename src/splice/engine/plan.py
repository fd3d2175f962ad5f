"""Plan a recipe into per-output-tensor work, from headers and configs only.

Planning decides, for every output tensor, which input tensors it needs, the
method parameters that apply to it, and its output dtype and shape, and it
checks shapes before anything is computed.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import architecture as arch
from ..checkpoint.reader import ModelSource, open_model
from ..errors import CheckpointError, MergeError, RecipeError
from ..methods import MergeMethod, get_method
from ..recipe import Recipe, Slice, Source, evaluate, load_recipe

if TYPE_CHECKING:
    from ..calibration import Statistics

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Input:
    model: str  # model reference
    tensor: str  # tensor name in that model
    rows: list[int] | None = None  # vocabulary permutation: output row -> input row (-1: missing)


@dataclass
class Job:
    out_name: str
    inputs: list[Input]  # contributing models, base excluded when the method uses a base
    base: Input | None
    kwargs: dict[str, Any]
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    nbytes: int
    copy: bool = False  # plain copy of inputs[0] (passthrough, or non-float tensors)
    scale: float = 1.0
    # data-aware methods: per input, (its model's statistics, the key of this tensor's); None: none measured
    statistics: list[tuple[Statistics, str]] | None = None


@dataclass
class Plan:
    recipe: Recipe
    method: MergeMethod
    jobs: list[Job]
    config: dict
    reference: str  # model whose config/tokenizer shape the output
    layer_sources: list[int]
    tokenizer: Any = None  # splice.tokenizer.TokenizerPlan or None
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


class RecipePlanner:
    def __init__(self, recipe: Recipe, sources: dict[str, ModelSource]):
        self.recipe = recipe
        self.sources = sources
        self.method = get_method(recipe.merge_method)
        self.warnings: list[str] = list(recipe.warnings)  # e.g. parameters the method does not use
        self.statistics: dict[str, Statistics] = {}  # model -> its calibration statistics (data-aware methods)

    def _src(self, ref: str) -> ModelSource:
        return self.sources[ref]

    def slices(self) -> list[Slice]:
        r = self.recipe
        if r.slices is not None:
            return r.slices
        srcs = []
        for m in r.models or []:
            n = arch.num_layers(self._src(m.model).config, self._src(m.model).keys())
            srcs.append(Source(model=m.model, layer_range=(0, n), parameters=m.parameters))
        if r.base_model and r.base_model not in [s.model for s in srcs]:
            n = arch.num_layers(self._src(r.base_model).config, self._src(r.base_model).keys())
            srcs.append(Source(model=r.base_model, layer_range=(0, n)))
        lengths = {s.layer_range[1] for s in srcs}
        if len(lengths) > 1:
            desc = ", ".join(f"{s.model}: {s.layer_range[1]}" for s in srcs)
            raise MergeError(f"models have different layer counts ({desc}); use slices to choose layer ranges")
        return [Slice(sources=srcs)]

    def _param_value(self, name: str, model: str | None, tensor: str, t: float, sl: Slice) -> Any:
        """mergekit's lookup order: the source's own parameters, the slice's, then the recipe's."""
        if model is not None:
            for s in sl.sources:
                if s.model == model and name in s.parameters:
                    v = evaluate(s.parameters[name], tensor, t)
                    if v is not None:
                        return v
        if name in sl.parameters:
            v = evaluate(sl.parameters[name], tensor, t)
            if v is not None:
                return v
        if name in self.recipe.parameters:
            v = evaluate(self.recipe.parameters[name], tensor, t)
            if v is not None:
                return v
        return None

    def _resolve(self, name_in: dict[str, str], out_name: str, t: float, sl: Slice, contributors: list[str]) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        for p in self.method.params:
            if p.per_model:
                vals = []
                for m in contributors:
                    v = self._param_value(p.name, m, name_in[m], t, sl)
                    if v is None:
                        if p.required:
                            raise RecipeError(
                                f"merge method {self.method.name!r} needs parameter {p.name!r} for model {m} (tensor {out_name})"
                            )
                        v = p.default
                    vals.append(v)
                kw[p.py_name] = vals
            else:
                v = self._param_value(p.name, None, out_name, t, sl)
                if v is None:
                    if p.required:
                        raise RecipeError(f"merge method {self.method.name!r} needs parameter {p.name!r} (tensor {out_name})")
                    v = p.default
                kw[p.py_name] = v
        return kw

    def _find(self, ref: str, name: str) -> str | None:
        """The name of tensor ``name`` in model ``ref``, following tied embeddings."""
        src = self._src(ref)
        if name in src:
            return name
        if arch.classify(name).kind == "head":
            return next((cand for cand in arch.TIED_EMBEDDING_NAMES if cand in src), None)
        return None

    def _statistics_of(self, out_name: str, inputs: list[Input], shapes: dict[str, tuple]) -> list[tuple[Statistics, str]] | None:
        """Each input's (statistics, key) for one output tensor, shapes checked; None when no model measured it."""
        kind = self.method.statistics
        found = [(self.statistics[i.model], self.statistics[i.model].key_for(i.tensor, kind)) for i in inputs]
        have = [i.model for i, (_, key) in zip(inputs, found) if key is not None]
        if not have:
            return None
        if len(have) < len(inputs):
            lacking = next(i.model for i, (_, key) in zip(inputs, found) if key is None)
            raise MergeError(
                f"tensor {out_name}: the statistics of {have[0]} measure it but those of {lacking} "
                f"({self.statistics[lacking].path}) do not; calibrate the models the same way"
            )
        for inp, (st, key) in zip(inputs, found):
            shape, got = shapes[inp.model], st.shapes[key]
            if kind == "fisher":
                want = tuple(shape)
            else:  # a Linear's input Gram, or an embedding's token counts
                want = (shape[1], shape[1]) if len(got) == 2 and len(shape) == 2 else (shape[0],)
            if tuple(got) != want:
                raise MergeError(
                    f"tensor {out_name}: statistics {st.path} [{key}] have shape {list(got)}, which does not fit "
                    f"{inp.model}'s tensor {list(shape)}; they come from another model"
                )
        return found

    def build(self, out_dtype_override: str | None = None) -> Plan:
        r = self.recipe
        method = self.method
        slices = self.slices()
        for i, sl in enumerate(slices):
            base = sl.base_model or r.base_model
            uses_base = method.base != "none"
            if method.base == "required" and base not in [s.model for s in sl.sources]:
                if r.slices is not None:
                    raise RecipeError(f"slice {i}: base model {base} must be one of the slice's sources for {method.name!r}")
            n_contrib = len([s for s in sl.sources if not (uses_base and s.model == base)])
            if n_contrib < method.min_models:
                raise RecipeError(
                    f"merge method {method.name!r} needs at least {method.min_models} model(s) besides the base, got {n_contrib}"
                )
            if method.max_models is not None and n_contrib > method.max_models:
                raise RecipeError(
                    f"merge method {method.name!r} takes at most {method.max_models} model(s) besides the base, got {n_contrib}"
                )
            for s in sl.sources:
                n = arch.num_layers(self._src(s.model).config, self._src(s.model).keys())
                if s.layer_range[1] > n:
                    raise RecipeError(f"slice {i}: layer_range {list(s.layer_range)} is out of range for {s.model} ({n} layers)")

        if method.statistics:
            uses_base = method.base != "none"
            contributors = [s.model for sl in slices for s in sl.sources if not (uses_base and s.model == (sl.base_model or r.base_model))]
            self.statistics = open_calibration(r, {m: self._src(m) for m in dict.fromkeys(contributors)})

        # the reference model: the base (or first model) of the first slice
        ref = r.base_model or slices[0].sources[0].model
        ref_src = self._src(ref)
        ref_names = ref_src.keys()
        cfg = ref_src.config
        if not cfg:
            raise CheckpointError(f"model {ref}: no config.json; the output's config.json is made from the reference model's")

        dtype_name = out_dtype_override or r.out_dtype or r.dtype
        out_dt = TORCH_DTYPES[dtype_name] if dtype_name else None

        # tokenizer / vocabulary plan
        from ..tokenizer import plan_vocab

        tok = plan_vocab(r, self.sources, ref, [s.model for sl in slices for s in sl.sources] + ([r.base_model] if r.base_model else []))
        if tok is not None:
            self.warnings.extend(tok.warnings)

        jobs: list[Job] = []
        layer_sources: list[int] = []
        non_layer = [n for n in ref_names if arch.classify(n).layer is None]
        pre = [n for n in non_layer if arch.classify(n).kind == "embed"]
        post = [n for n in non_layer if arch.classify(n).kind != "embed"]

        def add(out_name: str, names: dict[str, str], sl: Slice, t: float) -> None:
            base = sl.base_model or r.base_model
            uses_base = method.base != "none"
            models = [s.model for s in sl.sources]
            contributors = [m for m in models if not (uses_base and m == base)]
            base_in = names.get(base) if uses_base and base else None
            if uses_base and base and base_in is None and method.base == "required":
                raise CheckpointError(f"model {base}: tensor {out_name!r} not found")
            shapes = {m: tuple(self._src(m).info(names[m]).shape) for m in models if m in names}
            dtypes = {m: self._src(m).info(names[m]).dtype for m in models if m in names}
            role = arch.classify(out_name)
            vocab = role.vocab and tok is not None
            if not vocab and len(set(shapes.values())) > 1:
                desc = ", ".join(f"{m} {list(s)}" for m, s in shapes.items())
                if role.vocab and len({sh[1:] for sh in shapes.values()}) == 1:
                    raise MergeError(f"tensor {out_name}: vocabulary sizes differ ({desc}); set tokenizer_source: base or union")
                raise MergeError(f"tensor {out_name}: shape mismatch ({desc})")
            ref_model = base if base in names else contributors[0]
            shape = tuple(shapes[ref_model])
            rows = {}
            if vocab:
                shape = (tok.size,) + shape[1:]
                rows = {m: tok.rows(m) for m in names}
            in_dt = dtypes[ref_model]
            if in_dt.is_floating_point:
                # no dtype in the recipe: torch's promotion over the inputs this tensor reads, as mergekit 0.1.5
                # (a bf16 base and an f32 fine-tune give f32, not the base's bf16)
                used = [dtypes[m] for m in contributors if m in dtypes]
                if base_in is not None:
                    used.append(self._src(base).info(base_in).dtype)
                in_dt = functools.reduce(torch.promote_types, [d for d in used if d.is_floating_point], in_dt)
            odt = out_dt if (out_dt is not None and in_dt.is_floating_point) else in_dt
            nbytes = odt.itemsize if hasattr(odt, "itemsize") else torch.empty((), dtype=odt).element_size()
            for s in shape:
                nbytes *= s
            kw = self._resolve(names, out_name, t, sl, contributors)
            inputs = [Input(m, names[m], rows.get(m)) for m in contributors]
            base_inp = Input(base, base_in, rows.get(base)) if base_in is not None else None
            job = Job(out_name, inputs, base_inp, kw, shape, odt, nbytes)
            if not in_dt.is_floating_point:
                job.copy = True  # integer buffers are copied from the reference model
                job.inputs = [Input(ref_model, names[ref_model])]
            elif method.name == "passthrough" and len(inputs) == 1 and not vocab:
                scale = kw.get("scale")
                scale = scale[0] if isinstance(scale, list) else scale
                job.scale = 1.0 if scale is None else float(scale)
                job.copy = job.scale == 1.0 and odt == in_dt
            if method.statistics and not job.copy:
                job.statistics = self._statistics_of(out_name, inputs, {m: shapes[m] for m in contributors})
            jobs.append(job)

        def non_layer_job(name: str, sl: Slice, t: float) -> None:
            names = {}
            for s in sl.sources:
                found = self._find(s.model, name)
                if found is None:
                    raise CheckpointError(f"model {s.model}: tensor {name!r} not found")
                names[s.model] = found
            base = sl.base_model or r.base_model
            if base and base not in names and method.base != "none":
                found = self._find(base, name)
                if found is None:
                    raise CheckpointError(f"model {base}: tensor {name!r} not found")
                names[base] = found
            add(name, names, sl, t)

        for name in pre:
            non_layer_job(name, slices[0], 0.0)
        out_layer = 0
        for si, sl in enumerate(slices):
            length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
            first = sl.sources[0]
            first_src = self._src(first.model)
            for idx in range(length):
                t = idx / (length - 1) if length > 1 else 1.0
                src_layer = first.layer_range[0] + idx
                layer_names = [n for n in first_src.keys() if arch.classify(n).layer == src_layer]
                if not layer_names:
                    raise CheckpointError(f"model {first.model}: no tensors found for layer {src_layer}")
                for n in layer_names:
                    role = arch.classify(n)
                    out_name = role.renamed(out_layer)
                    names: dict[str, str] = {}
                    for s in sl.sources:
                        want = role.renamed(s.layer_range[0] + idx)
                        if want not in self._src(s.model):
                            raise CheckpointError(f"model {s.model}: tensor {want!r} not found")
                        names[s.model] = want
                    add(out_name, names, sl, t)
                layer_sources.append(src_layer)
                out_layer += 1
        # mergekit plans the tensors before and after the layers with t = 0 (its
        # ConfigReader(t=0) for pre- and post-weights), so a gradient gives the final
        # norm and the output head its first value, not its last.
        for name in post:
            non_layer_job(name, slices[-1], 0.0)

        new_cfg = arch.restack_config(cfg, layer_sources)
        tcfg = arch.text_config(new_cfg)
        if dtype_name:
            for key in ("torch_dtype", "dtype"):
                if key in tcfg or key == "torch_dtype":
                    tcfg[key] = dtype_name
        if tok is not None:
            tcfg["vocab_size"] = tok.size
        return Plan(r, method, jobs, new_cfg, ref, layer_sources, tok, self.warnings)


def _recipe_path(recipe: Recipe, file: str) -> Path:
    """``file`` as written in the recipe, taken from the recipe's folder when it exists there."""
    base_dir = recipe.path.parent if recipe.path is not None else None
    p = Path(os.path.expanduser(file))
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        p = base_dir / p
    return p


def calibration_paths(recipe: Recipe) -> dict[str, Path]:
    """Each model's statistics file, or the calibration text it is measured from (``{text: ...}`` entries)."""
    return {m: _recipe_path(recipe, v["text"] if isinstance(v, dict) else v) for m, v in recipe.calibration.items()}


def open_calibration(recipe: Recipe, sources: dict[str, ModelSource], quiet: bool = True) -> dict[str, Statistics]:
    """The statistics of each model in ``sources``, checked to come from that model (its fingerprint).

    A ``{text: ...}`` entry is measured by ``splice.calibration.calibrate`` into the statistics cache
    (``splice.calibration.cache``), or found there when the same model, text and settings were measured before.
    """
    from ..calibration import model_fingerprint, open_statistics

    paths = calibration_paths(recipe)
    wants_fisher = bool(recipe.merge_method) and get_method(recipe.merge_method).statistics == "fisher"
    out = {}
    for model, src in sources.items():
        if model not in paths:
            raise RecipeError(
                f"merge method {recipe.merge_method!r} needs calibration statistics for model {model}: "
                f"add it under 'calibration:' (splice calibrate {model} --text FILE -o FILE writes them)"
            )
        spec = recipe.calibration[model]
        if isinstance(spec, dict):  # calibrate from text, or reuse the cached statistics of the same request
            from ..calibration import calibrate

            settings = {k: v for k, v in spec.items() if k != "text"}
            paths[model] = Path(calibrate(src, paths[model], None, fisher=wants_fisher, quiet=quiet, **settings)["out"])
        st = open_statistics(paths[model])
        if wants_fisher and not st.fisher:
            raise CheckpointError(
                f"statistics file {paths[model]} holds no Fisher; {recipe.merge_method!r} needs one (splice calibrate --fisher)"
            )
        if st.meta.get("model_fingerprint") != model_fingerprint(src):
            raise CheckpointError(
                f"statistics file {paths[model]} was measured on model {st.meta.get('model', '?')}, not on {model} "
                f"(their fingerprints differ); calibrate {model} itself"
            )
        out[model] = st
    return out


def open_sources(recipe: Recipe, allow_pickle: bool = False) -> dict[str, ModelSource]:
    base_dir = recipe.path.parent if recipe.path is not None else None
    out: dict[str, ModelSource] = {}
    for ref in recipe.referenced_models():
        out[ref] = open_model(ref, allow_pickle=allow_pickle, base_dir=base_dir)
    return out


def plan_recipe(
    recipe: Recipe | str | Path | dict, sources: dict[str, ModelSource] | None = None, allow_pickle: bool = False
) -> tuple[Plan, dict[str, ModelSource]]:
    recipe = load_recipe(recipe)
    sources = sources or open_sources(recipe, allow_pickle)
    return RecipePlanner(recipe, sources).build(), sources
