"""Whole-tensor reductions whose bits do not depend on the number of threads.

torch splits the reduction of a whole tensor to one number across its intra-op
threads and adds the partial results in an order that depends on how many there
are: the same L1 norm differs in its last bit between ``threads=1`` and
``threads=2``, and so does every DARE or DELLA delta rescaled by it.  A reduction
with several outputs is split between the outputs instead, each computed by one
thread in a fixed order, so its bits do not depend on the thread count.

These helpers therefore reduce a flattened tensor as rows of ``SUM_BLOCK``
elements (one partial result per row, thread-independent), then add the partials
with ``math.fsum``, which is exactly rounded and so independent of their order.
The result is a 0-d tensor of the input's dtype and device, like torch's.  Two
torch reductions are thread-independent already and are used as they are (the
tests check both): along the last axis of a tensor with several rows, and the
L2 norm of a contiguous 1-D tensor (a single-threaded kernel in torch), which
keeps the bits of the methods that only take L2 norms.
"""

from __future__ import annotations

import math

import torch

from ._sizes import SUM_BLOCK


def _partials(flat: torch.Tensor, reduce) -> list[float]:
    """``reduce(rows, dim=1)`` over SUM_BLOCK-element rows of ``flat``, plus the ragged tail, as floats."""
    whole = flat.numel() // SUM_BLOCK * SUM_BLOCK
    parts = reduce(flat[:whole].view(-1, SUM_BLOCK), 1).tolist() if whole else []
    return parts + [float(reduce(flat[whole:], 0))]


def l1_partials(flat: torch.Tensor) -> list[float]:
    """The partial L1 norms ``norm(x, 1)`` adds up, for a flat tensor.

    A chunk of a larger flat tensor that starts at a multiple of ``SUM_BLOCK``
    (and, unless it is the last, also ends at one) yields exactly the whole
    tensor's partials over that span (plus a 0.0): ``fsum`` of every chunk's
    partials is the whole tensor's ``norm(x, 1)`` (the chunked paths rely on it).
    """
    return _partials(flat, lambda v, d: torch.linalg.vector_norm(v, 1, dim=d))


def sum_partials(flat: torch.Tensor) -> list[float]:
    """The partial sums ``total`` adds up, for a flat tensor (chunks of a larger one: as ``l1_partials``)."""
    return _partials(flat, lambda v, d: v.sum(dim=d))


def norm_from_squares(parts: list[float], like: torch.Tensor) -> torch.Tensor:
    """The L2 norm from partial sums of squares (``sum_partials(x * x)``, chunk by chunk), as a 0-d tensor like ``like``.

    Exactly rounded sum of the partials, square root in float64, one rounding to
    ``like``'s dtype.  Not the bits of ``torch.linalg.vector_norm`` (whose
    internal order a chunked pass cannot follow): within a few units in the
    last place of it.
    """
    return _scalar(math.sqrt(math.fsum(parts)), like)


def scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d tensor of ``like``'s dtype and device (how these helpers return a sum)."""
    return _scalar(value, like)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def total(x: torch.Tensor) -> torch.Tensor:
    """``x.sum()``, thread-count independent."""
    return _scalar(math.fsum(_partials(x.reshape(-1), lambda v, d: v.sum(dim=d))), x)


def norm(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """``torch.linalg.vector_norm(x, p)`` (p = 1 or 2) over the whole tensor, thread-count independent."""
    flat = x.reshape(-1)  # contiguous
    if p == 2:
        return torch.linalg.vector_norm(flat)
    return _scalar(math.fsum(l1_partials(flat)), x)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.dot`` of the flattened tensors, thread-count independent."""
    return total(a.reshape(-1) * b.reshape(-1))


def _single_row(x: torch.Tensor) -> bool:
    return math.prod(x.shape[:-1]) == 1


def norm_last(x: torch.Tensor, p: int = 2, keepdim: bool = False) -> torch.Tensor:
    """``torch.linalg.vector_norm(x, p, dim=-1, keepdim=keepdim)``, thread-count independent."""
    if not _single_row(x):
        return torch.linalg.vector_norm(x, p, dim=-1, keepdim=keepdim)
    out = norm(x, p)
    return out.reshape(x.shape[:-1] + (1,) if keepdim else x.shape[:-1])


def sum_last(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """``x.sum(dim=-1, keepdim=keepdim)``, thread-count independent."""
    if not _single_row(x):
        return x.sum(dim=-1, keepdim=keepdim)
    out = total(x)
    return out.reshape(x.shape[:-1] + (1,) if keepdim else x.shape[:-1])
