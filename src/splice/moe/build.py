"""``splice moe``: dense experts -> one sparse MoE checkpoint, streamed tensor by tensor.

Attention, norms and embeddings come from the base; each expert's MLP from its
donor; one router per layer from the gate initialiser (and, with
``calibrate=STEPS``, trained briefly on the experts' own text). Everything is
checked and the gates are computed before the output folder is created, so a
bad input writes nothing.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import architecture as arch
from .. import options as checks  # build_moe's parameter is called options
from ..checkpoint import SideFiles, open_model
from ..checkpoint.card import MOE_RECIPE_FILE, recipe_text
from ..checkpoint.writer import check_output
from ..engine.plan import TORCH_DTYPES
from ..engine.write import Entry, torch_threads, write_checkpoint
from ..errors import CheckpointError, RecipeError
from .experts import expert_tensor
from .families import ATTN_BIAS_RE, DENSE_MLP_RE, PROJS, Family, choose_family
from .gates import GATE_INITIALISERS, GateContext, check_gates
from .recipe import MoERecipe, load_moe_recipe

DISTANCE_WARN = 0.7  # relative distance above which an expert looks unrelated to the base (independent inits: ~1.4)


@dataclass
class MoEOptions:
    force: bool = False
    seed: int = 0
    calibrate: int = 0  # router calibration steps (0: none)
    calibration_tokens: int = 2048  # per expert
    calibration_lr: float = 0.01
    calibration_seq_len: int = 256
    balance: float = 0.01  # load-balancing coefficient during calibration
    shard_size: int | str = "5GB"
    allow_pickle: bool = False
    quiet: bool = False
    threads: int | None = None
    write_card: bool = True
    workers: int | None = None  # tensors written at once (see splice.engine.write_checkpoint)
    tune_malloc: bool = False  # the CLI turns it on; a library call leaves the allocator alone

    def __post_init__(self) -> None:
        """Refuse unusable values before any work (splice.options' checks, shared with the CLI)."""
        checks.seed(self.seed)
        checks.non_negative_int(self.calibrate, "calibrate")
        checks.positive_int(self.calibration_tokens, "calibration_tokens")
        checks.positive_real(self.calibration_lr, "calibration_lr")
        checks.integer(self.calibration_seq_len, "calibration_seq_len", minimum=2)
        checks.real(self.balance, "balance", minimum=0)
        checks.size(self.shard_size, "shard_size")
        checks.optional(checks.positive_int, self.threads, "threads")


@dataclass
class _Entry:
    name: str
    shape: tuple[int, ...]
    make: Any  # () -> tensor (any float dtype)


@dataclass
class MoEPlan:
    recipe: MoERecipe
    family: Family
    prefix: str
    layers: int
    hidden: int
    intermediate: int
    shared_intermediate: int | None
    entries: list[_Entry]
    config: dict
    out_dtype: torch.dtype
    warnings: list[str] = field(default_factory=list)


def _where(r: MoERecipe) -> str:
    return str(r.path) if r.path else "<recipe>"


def _dtype_name(cfg: dict) -> str:
    d = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return d if d in TORCH_DTYPES else "float32"


def _mlp_layout(src, where: str) -> tuple[str, dict[int, dict[str, tuple]]]:
    """Layer prefix and ``{layer: {proj: shape}}`` of a dense donor's MLP; errors on MLPs we cannot split."""
    prefix = None
    out: dict[int, dict[str, tuple]] = {}
    for name in src.keys():
        m = DENSE_MLP_RE.match(name)
        if m:
            prefix = m.group("prefix")
            out.setdefault(int(m.group("layer")), {})[m.group("proj")] = tuple(src.info(name).shape)
        elif ".mlp." in name and arch.classify(name).layer is not None:
            raise CheckpointError(
                f"model {src.name}: MLP tensor {name!r} is not a gate/up/down projection weight; only gated (SwiGLU) MLPs without bias can become experts"
            )
    if prefix is None:
        raise CheckpointError(
            f"model {src.name}: no gated MLP weights (layers.N.mlp.gate_proj/up_proj/down_proj) found; {where} needs Llama-style donors"
        )
    return prefix, out


def _relative_distance(base, other, prefix: str, layers: int) -> float | None:
    """||other - base|| / ||base|| over the weight matrices of the first and middle layer both models hold.

    Norm weights are left out: they start at one in every model and would hide the difference.
    """
    num = den = 0.0
    picks = {0, layers // 2}
    bkeys = set(base.keys())
    for name in other.keys():
        role = arch.classify(name)
        if role.layer not in picks or name not in bkeys:
            continue
        shape = tuple(base.info(name).shape)
        if len(shape) != 2 or shape != tuple(other.info(name).shape):
            continue
        b = base.get(name).to(torch.float32)
        o = other.get(name).to(torch.float32)
        num += float((o - b).pow(2).sum())
        den += float(b.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else None


def plan_moe(r: MoERecipe, sources: dict, opts: MoEOptions) -> MoEPlan:
    where = _where(r)
    base = sources[r.base_model]
    bcfg = arch.text_config(base.config)
    btype = bcfg.get("model_type") or base.config.get("model_type")
    if not btype:
        raise CheckpointError(f"model {base.name}: config.json has no model_type")
    family = choose_family(btype, r.architecture, bool(r.shared_experts), where)
    hidden = bcfg.get("hidden_size")
    layers = arch.num_layers(base.config, base.keys())
    prefix, base_mlp = _mlp_layout(base, where)

    def check_donor(e, label: str) -> dict[int, dict[str, tuple]]:
        src = sources[e.source_model]
        cfg = arch.text_config(src.config)
        mt = cfg.get("model_type") or src.config.get("model_type")
        if mt != btype:
            raise CheckpointError(
                f"{label} {e.source_model!r} is a {mt!r} model but the base {r.base_model!r} is {btype!r}; every donor must have the base's architecture"
            )
        if cfg.get("hidden_size") != hidden:
            raise CheckpointError(
                f"{label} {e.source_model!r} has hidden size {cfg.get('hidden_size')} but the base {r.base_model!r} has {hidden}"
            )
        n = arch.num_layers(src.config, src.keys())
        if n != layers:
            raise CheckpointError(f"{label} {e.source_model!r} has {n} layers but the base {r.base_model!r} has {layers}")
        if cfg.get("hidden_act", "silu") != bcfg.get("hidden_act", "silu"):
            raise CheckpointError(
                f"{label} {e.source_model!r} uses activation {cfg.get('hidden_act')!r}, the base {bcfg.get('hidden_act')!r}"
            )
        p, mlp = _mlp_layout(src, where)
        if p != prefix or sorted(mlp) != list(range(layers)) or any(len(mlp[i]) != 3 for i in mlp):
            raise CheckpointError(f"{label} {e.source_model!r}: its MLP tensors do not cover layers 0..{layers - 1} under {prefix!r}")
        return mlp

    warnings: list[str] = []
    routed = [check_donor(e, f"expert {i}") for i, e in enumerate(r.experts)]
    inter = routed[0][0]["gate"][0]
    for i, mlp in enumerate(routed):
        for l in range(layers):
            want = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
            if mlp[l] != want:
                raise CheckpointError(
                    f"expert {i} {r.experts[i].source_model!r}: layer {l} MLP shapes {mlp[l]} differ from expert 0's {want}; all routed experts need the same intermediate size"
                )
    shared_inter = None
    if r.shared_experts:
        smlp = check_donor(r.shared_experts[0], "shared expert")
        shared_inter = smlp[0]["gate"][0]

    if family.name == "mixtral":
        biased = [k for k in base.keys() if k.endswith("_proj.bias") and "self_attn" in k]
        if biased:
            raise CheckpointError(
                f"model {r.base_model!r}: attention biases ({biased[0]}) cannot go into Mixtral; use architecture qwen2_moe with a shared expert"
            )

    # warnings: unrelated base, repeated experts
    for i, e in enumerate(r.experts + r.shared_experts):
        label = f"expert {i}" if i < len(r.experts) else "shared expert"
        if e.source_model == r.base_model:
            continue
        d = _relative_distance(base, sources[e.source_model], prefix, layers)
        if d is not None and d > DISTANCE_WARN:
            warnings.append(
                f"{label} {e.source_model!r} is far from the base {r.base_model!r} (relative parameter distance {d:.2f}); "
                "is the base really the model it was fine-tuned from? Attention and norms come from the base"
            )
    seen: dict[str, int] = {}
    for i, e in enumerate(r.experts):
        j = seen.setdefault(e.source_model, i)
        if j != i:
            warnings.append(f"experts {j} and {i} are the same model {e.source_model!r}: the MoE costs more and computes the same")

    out_dtype_name = r.dtype or _dtype_name(base.config)
    out_dtype = TORCH_DTYPES[out_dtype_name]

    entries: list[_Entry] = []
    heads = bcfg.get("num_attention_heads")
    kv = bcfg.get("num_key_value_heads", heads)
    head_dim = bcfg.get("head_dim") or (hidden // heads if heads else None)
    bkeys = set(base.keys())
    for name in base.keys():
        if DENSE_MLP_RE.match(name):
            continue
        entries.append(_Entry(name, tuple(base.info(name).shape), (lambda n=name: base.get(n))))
        m = ATTN_BIAS_RE.match(name)
        if family.name == "qwen2_moe" and m and name.replace(".weight", ".bias") not in bkeys:
            rows = base.info(name).shape[0]
            entries.append(_Entry(name.replace(".weight", ".bias"), (rows,), (lambda rows=rows: torch.zeros(rows))))

    seed = opts.seed
    for l in range(layers):
        for e_i, e in enumerate(r.experts):
            src = sources[e.source_model]
            for proj in PROJS:
                shape = (hidden, inter) if proj == "down" else (inter, hidden)
                entries.append(
                    _Entry(
                        family.expert_name(prefix, l, e_i, proj),
                        shape,
                        (lambda src=src, e=e, s=f"expert{e_i}", l=l, p=proj: expert_tensor(src, e, s, prefix, l, p, seed)),
                    )
                )
        if r.shared_experts:
            e = r.shared_experts[0]
            src = sources[e.source_model]
            for proj in PROJS:
                shape = (hidden, shared_inter) if proj == "down" else (shared_inter, hidden)
                entries.append(
                    _Entry(
                        family.shared_name(prefix, l, proj),
                        shape,
                        (lambda src=src, e=e, l=l, p=proj: expert_tensor(src, e, "shared0", prefix, l, p, seed)),
                    )
                )
    top_k = r.experts_per_token
    config = family.config(
        base.config, experts=len(r.experts), top_k=top_k, intermediate=inter, shared_intermediate=shared_inter, dtype=out_dtype_name
    )
    if head_dim and kv and family.name == "qwen2_moe" and hidden // heads != head_dim:
        raise CheckpointError(f"model {r.base_model!r}: head_dim {head_dim} != hidden_size/num_attention_heads; Qwen2-MoE cannot hold it")
    return MoEPlan(r, family, prefix, layers, hidden, inter, shared_inter, entries, config, out_dtype, warnings)


class _Features:
    """Lazily built dense runner, shared by the ``hidden`` initialiser and calibration."""

    def __init__(self, r: MoERecipe, sources: dict, plan: MoEPlan, opts: MoEOptions):
        self.r, self.sources, self.plan, self.opts = r, sources, plan, opts
        self._runner = None
        self._tok = None
        self._current = None

    def tokenizer(self):
        if self._tok is None:
            from ..hf import source_tokenizer

            self._tok = source_tokenizer(
                self.sources[self.r.base_model], f"gate_mode {self.r.gate_mode!r} / calibration needs the base's tokenizer"
            )
        return self._tok

    def runner(self):
        if self._runner is None:
            from .dense import DenseRunner

            self._runner = DenseRunner(self.sources[self.r.base_model], self.plan.prefix)
        return self._runner

    def router_inputs(self, expert, slot: str, sequences: list[list[int]]) -> list[torch.Tensor]:
        run = self.runner()
        if self._current != slot:
            run.use_expert(self.sources[expert.source_model], expert, slot, self.opts.seed)
            self._current = slot
        return run.router_inputs(sequences, skip_first=self.tokenizer().bos_token_id is not None)

    def mean_features(self, expert, slot: str, prompts: list[str], last: bool = False) -> torch.Tensor:
        """Per layer, the mean router input over the prompts' tokens (``last``: over each prompt's last token).

        The BOS token is never a feature, so a prompt with no other token adds
        nothing, and prompts that are all empty give zeros.
        """
        from .dense import encode

        tok = self.tokenizer()
        skip = 1 if tok.bos_token_id is not None else 0
        seqs = [s for s in (encode(tok, p, min(self.runner().max_len, 1024)) for p in prompts) if len(s) > skip]
        if not seqs:
            run = self.runner()
            return torch.zeros(len(run.mlps), run.hidden)
        if last:
            per_prompt = [torch.stack([f[-1] for f in self.router_inputs(expert, slot, [s])]) for s in seqs]
            return torch.stack(per_prompt).mean(0)
        feats = self.router_inputs(expert, slot, seqs)
        return torch.stack([f.mean(0) for f in feats])


def compute_gates(
    r: MoERecipe, sources: dict, plan: MoEPlan, opts: MoEOptions, feats: _Features
) -> tuple[torch.Tensor, torch.Tensor | None]:
    base = sources[r.base_model]
    embed = next((k for k in base.keys() if arch.classify(k).kind == "embed" and k.endswith("embed_tokens.weight")), None)
    init = GATE_INITIALISERS.get(r.gate_mode)

    def ctx_for(experts: list, slot: str) -> GateContext:
        return GateContext(
            recipe=r,
            layers=plan.layers,
            hidden=plan.hidden,
            seed=opts.seed,
            base_src=base,
            embed_name=embed,
            tokenizer=feats.tokenizer,
            features=lambda i, prompts, last=False: feats.mean_features(experts[i], f"{slot}{i}", prompts, last=last),
        )

    gates = init(ctx_for(r.experts, "expert"), r.experts, "routed")
    plan.warnings += check_gates(gates, [f"{i} ({e.source_model})" for i, e in enumerate(r.experts)])
    shared = None
    if r.shared_experts:
        shared = init(ctx_for(r.shared_experts, "shared"), r.shared_experts, "shared")
    return gates, shared


def calibrate(r: MoERecipe, plan: MoEPlan, opts: MoEOptions, feats: _Features, init: torch.Tensor):
    from .calibrate import read_documents, token_sequences, train_gates

    tok = feats.tokenizer()
    seq_len = min(opts.calibration_seq_len, feats.runner().max_len)
    per_expert = []
    for i, e in enumerate(r.experts):
        docs = read_documents(e.calibration_file) if e.calibration_file else list(e.positive_prompts)
        if not docs:
            raise RecipeError(f"{e.where}: expert {e.source_model!r} has neither calibration_file nor prompts to calibrate its router on")
        seqs = token_sequences(tok, docs, tokens=opts.calibration_tokens, seq_len=seq_len, seed=opts.seed + i)
        if not seqs:
            raise RecipeError(f"{e.where}: expert {e.source_model!r}: its calibration text is too short")
        per_expert.append(feats.router_inputs(e, f"expert{i}", seqs))
    return train_gates(
        init, per_expert, steps=opts.calibrate, lr=opts.calibration_lr, balance=opts.balance, top_k=r.experts_per_token, seed=opts.seed
    )


def build_moe(recipe: Any, out: str | Path, options: MoEOptions | None = None, **kw: Any) -> dict:
    """Build the MoE described by ``recipe`` (path, YAML text, dict or MoERecipe) into folder ``out``."""
    opts = options or MoEOptions(**kw)
    t0 = time.time()
    r = load_moe_recipe(recipe)
    base_dir = r.path.resolve().parent if r.path else None
    sources = {}
    try:
        for m in r.models():
            sources[m] = open_model(m, allow_pickle=opts.allow_pickle, base_dir=base_dir)
        check_output(out, force=opts.force, inputs=_inputs(r, sources))  # before any work
        plan = plan_moe(r, sources, opts)
        with torch_threads(opts.threads):  # restored when the build ends, however it ends
            feats = _Features(r, sources, plan, opts)
            timings = {"plan": time.time() - t0}
            t1 = time.time()
            gates, shared_gates = compute_gates(r, sources, plan, opts, feats)
            timings["gates"] = time.time() - t1
            calib = None
            if opts.calibrate > 0:
                t1 = time.time()
                calib = calibrate(r, plan, opts, feats, gates)
                gates = calib.gates
                timings["calibration"] = time.time() - t1
            feats._runner = None  # free the in-memory model before writing
            for w in plan.warnings:
                print(f"warning: {w}", file=sys.stderr)

            fam, p = plan.family, plan.prefix
            for l in range(plan.layers):
                plan.entries.append(_Entry(fam.router_name(p, l), (len(r.experts), plan.hidden), (lambda l=l: gates[l])))
                if shared_gates is not None:
                    plan.entries.append(_Entry(fam.shared_gate_name(p, l), (1, plan.hidden), (lambda l=l: shared_gates[l][:1])))
            t1 = time.time()
            written = _write(plan, sources, out, opts, calib)
            timings["write"] = time.time() - t1
    finally:
        for s in sources.values():
            s.close()
    summary = {
        "out": str(written),
        "family": plan.family.title,
        "experts": len(r.experts),
        "shared_experts": len(r.shared_experts),
        "experts_per_token": r.experts_per_token,
        "layers": plan.layers,
        "tensors": len(plan.entries),
        "gate_mode": r.gate_mode,
        "seconds": time.time() - t0,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "warnings": plan.warnings,
    }
    if calib is not None:
        summary["calibration"] = {
            "steps": calib.steps,
            "tokens_per_expert": calib.tokens,
            "heldout_routing_accuracy_before": calib.acc_before,
            "heldout_routing_accuracy_after": calib.acc_after,
            "per_expert_after": calib.acc_after_per_expert,
            "train_seconds": calib.seconds,
        }
    return summary


def _inputs(r: MoERecipe, sources: dict) -> list:
    """Every path a MoE build reads: the recipe, the models, the calibration files."""
    files = [e.calibration_file for e in r.experts + r.shared_experts]
    return [p for p in [r.path, *(p for s in sources.values() for p in s.input_paths()), *files] if p is not None]


# float32 copies alive while one expert tensor is made: the donor's, the noise and the result
_EXPERT_COPIES = 3


def _write(plan: MoEPlan, sources: dict, out, opts: MoEOptions, calib) -> Path:
    r = plan.recipe
    base = sources[r.base_model]
    entries = [Entry(e.name, plan.out_dtype, e.shape, e.make, _EXPERT_COPIES * 4 * math.prod(e.shape)) for e in plan.entries]
    card = None
    if opts.write_card:
        from .card import moe_card

        def card(hashes: dict[str, str], _tokenizer_files: list[str]) -> str:
            return moe_card(plan, hashes, opts, calib)

    side = SideFiles(
        config=plan.config,
        model=r.base_model,
        tokenizer_dir=base.tokenizer_dir(),
        generation_config=base.generation_config(),
        card=card,
        recipe_file=(MOE_RECIPE_FILE, recipe_text(r)) if opts.write_card else None,
    )
    return write_checkpoint(
        out,
        entries,
        side,
        inputs=_inputs(r, sources),
        force=opts.force,
        shard_size=opts.shard_size,
        workers=opts.workers,
        threads=opts.threads,
        tune_malloc=opts.tune_malloc,
        label="moe",
        quiet=opts.quiet,
    )
