"""Tiny dense donors for the MoE tests: 'experts' that differ from a base only in their MLPs."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def make_expert(base: Path, out: Path, *, seed: int, scale: float = 0.05, permute: bool = False, everywhere: bool = False) -> Path:
    """A copy of ``base`` with its MLP weights perturbed (or, with ``permute``, its MLP units shuffled)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copyfile(f, out / f.name)
    g = torch.Generator().manual_seed(seed)
    sd = load_file(base / "model.safetensors")
    new = {}
    layers = {k.split(".mlp.")[0] for k in sd if ".mlp." in k}
    for k, v in sd.items():
        if ".mlp." in k or everywhere:
            v = v + scale * torch.randn(v.shape, generator=g) * (v.std() if v.numel() > 1 else 1.0)
        new[k] = v.contiguous()
    if permute:
        for pre in layers:
            n = new[f"{pre}.mlp.gate_proj.weight"].shape[0]
            perm = torch.randperm(n, generator=g)
            new[f"{pre}.mlp.gate_proj.weight"] = new[f"{pre}.mlp.gate_proj.weight"][perm].contiguous()
            new[f"{pre}.mlp.up_proj.weight"] = new[f"{pre}.mlp.up_proj.weight"][perm].contiguous()
            new[f"{pre}.mlp.down_proj.weight"] = new[f"{pre}.mlp.down_proj.weight"][:, perm].contiguous()
    save_file(new, out / "model.safetensors", metadata={"format": "pt"})
    return out


# Each expert's prompts draw from its own six tokens (the test tokenizer matches its special tokens
# t0, t1, t2 inside words, so ids 10-29 are avoided).
RANGES = [(30, 36), (50, 56), (75, 81)]
PROMPTS = {i: [" ".join(f"t{lo + (k * 5 + j) % (hi - lo)}" for k in range(8)) for j in range(3)] for i, (lo, hi) in enumerate(RANGES)}


def recipe(base, experts, **kw) -> dict:
    r = {
        "base_model": str(base),
        "gate_mode": kw.pop("gate_mode", "hidden"),
        "experts_per_token": kw.pop("experts_per_token", 1),
        "experts": [{"source_model": str(e), "positive_prompts": PROMPTS[i % 3]} for i, e in enumerate(experts)],
    }
    r.update(kw)
    return r
