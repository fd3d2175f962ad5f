"""Multi-SLERP: weighted interpolation of any number of models on a hypersphere.

Each model tensor (minus the base, when one is given) is flattened to x_i with
norm n_i and direction u_i = x_i / (n_i + eps). With weights w_i (divided by
their sum when normalize_weights is true):

    m     = sum_i w_i u_i,  m_hat = m / |m|        (weighted mean direction)
    v     = sum_i w_i (u_i - (u_i . m_hat) m_hat)  (tangent-space average at m_hat)
    r     = |v| + eps
    out   = (cos(r) m_hat + sin(r) v / r) * sum_i w_i n_i   (+ base)

This is mergekit's recipe: project onto the tangent space at the mean
direction, average there, map back with the exponential map, rescale to the
weighted mean norm. Since v = m - (m . m_hat) m_hat = 0 exactly, the tangent
step is the identity and the result is simply

    out = m_hat * sum_i w_i n_i   (+ base)

which is what is computed here, one model at a time (mergekit's result differs
only by the rounding noise of v, about 1e-7 relative).

If every x_i is zero (all models equal the base) the result is the base (mergekit
raises there).  Otherwise if |m| < eps the directions cancel: two models then fall back to the linear
w_0 x_0 + w_1 x_1 (+ base); more models are an error. One model is returned
unchanged.  With normalize_weights, weights that sum to 0 are an error (mergekit
divides by their sum regardless: NaN or inf).

Goddard 2025, "Multi-SLERP" (goddard.blog/posts/multislerp-wow-what-a-cool-idea);
parameter names, defaults and behaviour follow mergekit's `multislerp`: base
optional, one or more other models, per-model `weight`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _reduce
from ._geometry import work_dtype
from ._sizes import STREAM_CHUNK
from .registry import POSITIVE, Param, merge_method
from .task_arithmetic import WEIGHT_SUM_EPS


@merge_method(
    "multislerp",
    params=(
        Param("weight", per_model=True, help="weight of each model"),
        Param("normalize_weights", default=True, kind="bool", help="divide the weights by their sum"),
        Param("eps", default=1e-8, range=POSITIVE, help="small constant for numerical stability"),
    ),
    base="optional",
    summary="barycentric interpolation of several models on a hypersphere",
    paper="Goddard 2025, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
    min_models=1,
    max_models=None,
    native_dtype=True,
)
def multislerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weight: Sequence[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].to(work_dtype(tensors[0]), copy=True)

    shape = tensors[0].shape
    dtype = work_dtype(tensors[0])
    eps = float(eps)
    w = [float(v) for v in weight]
    if normalize_weights:
        total = sum(w)
        if abs(total) < WEIGHT_SUM_EPS:
            raise ValueError(f"normalize_weights divides by the sum of the weights {w}, which is 0; change the weights")
        w = [v / total for v in w]
    # Streamed in STREAM_CHUNK pieces from the stored dtype: the offsets' norms, then m (kept:
    # it becomes the output) with its norm, then the scaling; every element sees the same operations.
    flat = [t.reshape(-1) for t in tensors]
    fb = None if base is None else base.reshape(-1)
    size = flat[0].numel()
    spans = [(s, min(size, s + STREAM_CHUNK)) for s in range(0, size, STREAM_CHUNK)]
    like = torch.empty(0, dtype=dtype, device=tensors[0].device)

    def offset(i: int, s: int, e: int) -> torch.Tensor:
        x = flat[i][s:e].to(dtype)
        return x if fb is None else x - fb[s:e].to(dtype)

    squares = [[] for _ in tensors]
    for s, e in spans:
        for i in range(len(tensors)):
            x = offset(i, s, e)
            squares[i] += _reduce.sum_partials(x * x)
    norms = [_reduce.norm_from_squares(q, like) for q in squares]
    # m = sum_i w_i x_i / (|x_i| + eps), accumulated one model at a time.
    m = torch.zeros(size, dtype=dtype, device=tensors[0].device)
    m_squares = []
    for s, e in spans:
        mc = m[s:e]
        for i in range(len(tensors)):
            mc.add_(offset(i, s, e) * (w[i] / (norms[i] + eps)))
        m_squares += _reduce.sum_partials(mc * mc)
    m_norm = _reduce.norm_from_squares(m_squares, like)
    if m_norm.item() < eps and all(float(n) < eps for n in norms):
        # every model equals the base (or is zero): the result's norm, sum_i w_i n_i, is 0.
        # mergekit 0.1.5 raises here; this is the formula's limit, and what a user expects
        # for tensors no fine-tune touched (e.g. norms of MLP-only fine-tunes).
        m.zero_()
        combine = None
    elif m_norm.item() < eps:
        if len(tensors) != 2:
            raise ValueError("multislerp: the weighted directions cancel out (e.g. a and -a with equal weights); change the weights")
        combine = "linear"
    else:
        # The tangent average at m_hat is exactly zero (see the module docstring),
        # so the exponential map returns m_hat itself.
        scale = sum(wi * ni for wi, ni in zip(w, norms))
        combine = scale / m_norm
    for s, e in spans:
        o = m[s:e]
        if isinstance(combine, str):
            torch.mul(offset(0, s, e), w[0], out=o).add_(offset(1, s, e), alpha=w[1])
        elif combine is not None:
            torch.mul(o, combine, out=o)
        if fb is not None:
            o.add_(fb[s:e].to(dtype))
    return m.reshape(shape)  # the work dtype: float32 for stored bf16 (a native-dtype method)
