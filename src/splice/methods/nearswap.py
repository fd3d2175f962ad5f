"""NearSwap: take the other model's value only where it is already near the base.

Element-wise, with a = base, b = the other model and similarity threshold t:

    w   = clamp(t / max(|a - b|, 1e-6), 0, 1)
    out = w * b + (1 - w) * a

Where |a - b| <= t the parameter is swapped wholesale to b; further apart, b's
share falls off as t / |a - b|. t = 0 returns the base; a very large t
returns the other model; a negative t (which mergekit accepts) would return the
base everywhere and is refused.

alchemonaut 2024, QuartetAnemoi-70B-t0.0001 model card (Hugging Face), which
introduced the method; parameter names, defaults and behaviour follow
mergekit's `nearswap`: base required, exactly one other model, global `t`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._geometry import work_dtype
from ._sizes import STREAM_CHUNK
from .registry import NON_NEGATIVE, Param, merge_method

MIN_DIFF = 1e-6  # |a - b| is clamped to at least this before dividing


@merge_method(
    "nearswap",
    params=(Param("t", range=NON_NEGATIVE, help="similarity threshold: swap in values closer than t to the base"),),
    base="required",
    summary="swap in the other model's values where they lie within t of the base",
    paper="alchemonaut 2024, QuartetAnemoi-70B-t0.0001 (Hugging Face model card)",
    min_models=1,
    max_models=1,
    native_dtype=True,
)
def nearswap(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    t: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    dtype = work_dtype(base)
    fa, fb = base.reshape(-1), tensors[0].reshape(-1)
    out = torch.empty(fa.numel(), dtype=dtype, device=base.device)
    # elementwise: STREAM_CHUNK elements at a time, upcast from the stored dtype (the same bits as whole)
    for s in range(0, fa.numel(), STREAM_CHUNK):
        a = fa[s : s + STREAM_CHUNK].to(dtype)
        b = fb[s : s + STREAM_CHUNK].to(dtype)
        w = (float(t) / (a - b).abs_().clamp_(min=MIN_DIFF)).clamp_(0.0, 1.0)
        # w * b + (1 - w) * a  ==  a + w * (b - a), exact at w = 0 and w = 1
        torch.lerp(a, b, w, out=out[s : s + STREAM_CHUNK])
    return out.reshape(base.shape)  # the work dtype: float32 for stored bf16 (a native-dtype method)
