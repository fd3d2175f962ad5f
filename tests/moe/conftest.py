"""Tiny dense donors for the MoE tests: a base and 'experts' that differ from it only in their MLPs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers import make_model


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


@pytest.fixture(scope="session")
def moe_donors(tmp_path_factory):
    """A 2-layer Llama base and three MLP-only fine-tunes of it."""
    root = tmp_path_factory.mktemp("moe_llama")
    base = make_model(root / "base", "llama", seed=0, layers=2, hidden=64)
    experts = [make_expert(base, root / f"e{i}", seed=100 + i, scale=0.5) for i in range(3)]
    return base, experts


# Each expert's prompts draw from its own six tokens (the test tokenizer matches its special tokens
# t0, t1, t2 inside words, so ids 10-29 are avoided).
RANGES = [(30, 36), (50, 56), (75, 81)]
PROMPTS = {
    i: [" ".join(f"t{lo + (k * 5 + j) % (hi - lo)}" for k in range(8)) for j in range(3)]
    for i, (lo, hi) in enumerate(RANGES)
}


def recipe(base, experts, **kw) -> dict:
    r = {
        "base_model": str(base),
        "gate_mode": kw.pop("gate_mode", "hidden"),
        "experts_per_token": kw.pop("experts_per_token", 1),
        "experts": [{"source_model": str(e), "positive_prompts": PROMPTS[i % 3]} for i, e in enumerate(experts)],
    }
    r.update(kw)
    return r


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids thread contention on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
