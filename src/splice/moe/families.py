"""Output families: which MoE architecture a set of dense donors becomes, its tensor names and config.

Tensor names are the per-expert on-disk layout that both transformers 4.x and
5.x read (5.x fuses the experts into 3-D tensors while loading, and writes this
layout back when saving):

- Mixtral:    ``layers.N.block_sparse_moe.experts.E.{w1,w3,w2}.weight`` (gate, up, down), router ``block_sparse_moe.gate.weight``
- Qwen2-MoE:  ``layers.N.mlp.experts.E.{gate,up,down}_proj.weight``, router ``mlp.gate.weight``,
              ``mlp.shared_expert.{gate,up,down}_proj.weight`` and ``mlp.shared_expert_gate.weight``
- Qwen3-MoE:  as Qwen2-MoE without the shared expert
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from ..errors import RecipeError
from ..registry import Registry

PROJS = ("gate", "up", "down")
DENSE_MLP_RE = re.compile(r"^(?P<prefix>.*layers)\.(?P<layer>\d+)\.mlp\.(?P<proj>gate|up|down)_proj\.weight$")
ATTN_BIAS_RE = re.compile(r"^(?P<prefix>.*layers)\.(?P<layer>\d+)\.self_attn\.(?P<proj>[qkv])_proj\.weight$")


def dense_mlp_name(prefix: str, layer: int, proj: str) -> str:
    return f"{prefix}.{layer}.mlp.{proj}_proj.weight"


@dataclass(frozen=True)
class Family:
    name: str  # mixtral | qwen2_moe | qwen3_moe
    title: str
    architecture: str  # the transformers class
    donors: tuple[str, ...]  # model_types accepted as donors
    shared: str  # "none" | "required"
    expert_key: str  # config key holding the expert count

    def expert_name(self, prefix: str, layer: int, expert: int, proj: str) -> str:
        if self.name == "mixtral":
            w = {"gate": "w1", "up": "w3", "down": "w2"}[proj]
            return f"{prefix}.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"
        return f"{prefix}.{layer}.mlp.experts.{expert}.{proj}_proj.weight"

    def router_name(self, prefix: str, layer: int) -> str:
        if self.name == "mixtral":
            return f"{prefix}.{layer}.block_sparse_moe.gate.weight"
        return f"{prefix}.{layer}.mlp.gate.weight"

    def shared_name(self, prefix: str, layer: int, proj: str) -> str:
        return f"{prefix}.{layer}.mlp.shared_expert.{proj}_proj.weight"

    def shared_gate_name(self, prefix: str, layer: int) -> str:
        return f"{prefix}.{layer}.mlp.shared_expert_gate.weight"

    def config(self, base: dict, *, experts: int, top_k: int, intermediate: int, shared_intermediate: int | None, dtype: str) -> dict:
        """The output config.json: the base's, re-typed, with every MoE key written out."""
        cfg = copy.deepcopy(base)
        for k in ("architectures", "model_type", "auto_map", "_name_or_path", "pretraining_tp", "mlp_bias", "quantization_config"):
            cfg.pop(k, None)
        _rope_for_v4(cfg)
        cfg["architectures"] = [self.architecture]
        cfg["model_type"] = self.name
        cfg["dtype"] = dtype
        cfg["torch_dtype"] = dtype
        layers = cfg.get("num_hidden_layers")
        cfg["num_experts_per_tok"] = top_k
        cfg["output_router_logits"] = False
        cfg.setdefault("router_aux_loss_coef", 0.001)
        if self.name == "mixtral":
            cfg["num_local_experts"] = experts
            cfg["intermediate_size"] = intermediate
            cfg["router_jitter_noise"] = 0.0
            cfg.pop("attention_bias", None)
            cfg.setdefault("sliding_window", None)
        else:
            cfg["num_experts"] = experts
            cfg["moe_intermediate_size"] = intermediate
            cfg["intermediate_size"] = intermediate
            cfg["decoder_sparse_step"] = 1
            cfg["mlp_only_layers"] = []
            cfg["norm_topk_prob"] = True  # renormalise the top-k weights, as Mixtral does
            cfg["use_sliding_window"] = False
            cfg.setdefault("sliding_window", None)
            if layers:
                cfg["max_window_layers"] = layers
            if self.name == "qwen2_moe":
                cfg["shared_expert_intermediate_size"] = shared_intermediate
                cfg["qkv_bias"] = True  # transformers 4.x always has q/k/v biases in Qwen2-MoE
                cfg.pop("attention_bias", None)
                cfg.pop("layer_types", None)
        return cfg


def _rope_for_v4(cfg: dict) -> None:
    """transformers 5 saves ``rope_parameters``; 4.x reads ``rope_theta`` (+ ``rope_scaling``). Write both."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        if "rope_theta" in rp and "rope_theta" not in cfg:
            cfg["rope_theta"] = rp["rope_theta"]
        if rp.get("rope_type", "default") != "default" and not cfg.get("rope_scaling"):
            cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}


FAMILIES: Registry[Family] = Registry("MoE architecture")
FAMILIES.add("mixtral", Family("mixtral", "Mixtral", "MixtralForCausalLM", ("llama", "mistral"), "none", "num_local_experts"))
FAMILIES.add("qwen2_moe", Family("qwen2_moe", "Qwen2-MoE", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), "required", "num_experts"))
FAMILIES.add("qwen3_moe", Family("qwen3_moe", "Qwen3-MoE", "Qwen3MoeForCausalLM", ("qwen3",), "none", "num_experts"))

SUPPORTED_TEXT = "llama/mistral -> Mixtral; llama/mistral/qwen2 with one shared expert -> Qwen2-MoE; qwen3 -> Qwen3-MoE"


def choose_family(model_type: str, requested: str | None, has_shared: bool, where: str) -> Family:
    """The output family for donors of ``model_type`` (mergekit's choice: Mixtral when it fits)."""
    if requested is not None:
        fam = FAMILIES.get(requested)
        if model_type not in fam.donors:
            raise RecipeError(
                f"{where}: architecture {requested!r} cannot be built from {model_type!r} donors (supported: {SUPPORTED_TEXT})"
            )
    elif has_shared:
        fam = FAMILIES.get("qwen2_moe")
        if model_type not in fam.donors:
            raise RecipeError(
                f"{where}: shared experts need Qwen2-MoE output, which cannot be built from {model_type!r} donors (supported: {SUPPORTED_TEXT})"
            )
    elif model_type in ("llama", "mistral"):
        fam = FAMILIES.get("mixtral")
    elif model_type == "qwen3":
        fam = FAMILIES.get("qwen3_moe")
    elif model_type == "qwen2":
        raise RecipeError(f"{where}: qwen2 donors become Qwen2-MoE, which needs one shared expert (add 'shared_experts', e.g. the base)")
    else:
        raise RecipeError(f"{where}: no MoE output family for {model_type!r} donors (supported: {SUPPORTED_TEXT})")
    if fam.shared == "none" and has_shared:
        raise RecipeError(f"{where}: {fam.title} output has no shared expert; remove 'shared_experts' or use architecture qwen2_moe")
    if fam.shared == "required" and not has_shared:
        raise RecipeError(f"{where}: {fam.title} output needs exactly one shared expert ('shared_experts')")
    return fam


def family_of_moe(config: dict, where: str) -> Family:
    """The family of an existing MoE checkpoint (for moe-compress)."""
    mt = config.get("model_type")
    if mt not in FAMILIES:
        raise RecipeError(f"{where}: not a Mixtral, Qwen2-MoE or Qwen3-MoE checkpoint (model_type {mt!r})")
    return FAMILIES.get(mt)
