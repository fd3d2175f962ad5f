"""One expert's MLP tensors as they go into the MoE: read from the donor, with noise and residual scale.

The same function feeds the writer and the in-memory runs that compute gates,
so the gates are computed on exactly the weights that are written. Noise is
seeded per (seed, expert, tensor), so output files do not depend on order.
"""

from __future__ import annotations

import hashlib

import torch

from .families import dense_mlp_name


def _noise_seed(seed: int, slot: str, name: str) -> int:
    h = hashlib.sha256(f"{seed}|{slot}|{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def expert_tensor(src, expert, slot: str, prefix: str, layer: int, proj: str, seed: int) -> torch.Tensor:
    """float32 MLP weight ``proj`` (gate/up/down) of ``layer`` for one expert ("slot" names it: e.g. "expert3")."""
    name = dense_mlp_name(prefix, layer, proj)
    t = src.get(name).to(torch.float32)
    if expert.noise_scale:
        g = torch.Generator().manual_seed(_noise_seed(seed, slot, name))
        t = t + torch.randn(t.shape, generator=g) * expert.noise_scale
    if proj == "down" and expert.residual_scale is not None:
        t = t * expert.residual_scale
    return t
