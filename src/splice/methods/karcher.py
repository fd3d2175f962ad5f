"""Karcher mean: the Riemannian centre of mass of the models on a hypersphere.

Each model tensor is flattened to x_i with norm n_i and direction u_i = x_i / n_i.
All N models weigh alpha_i = 1/N. Directions of models whose norm is at or
below ``tol`` are left out of the mean (their weights renormalised over the
rest, a_i); if every model is that small the result is zero. Starting from
mu = normalise(sum_i a_i u_i) (or u of the first kept model if that sum
vanishes), repeat at most ``max_iter`` times:

    theta_i = arccos(mu . u_i)
    g       = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) mu)   (log maps; theta_i < tol skipped)
    stop if |g| < tol
    mu      = normalise(cos(|g|) mu + sin(|g|) g / |g|)                  (exponential map)

and return mu * sum_i alpha_i n_i (the plain average norm, counting every model).

Karcher 1977, "Riemannian center of mass and mollifier smoothing" (Comm. Pure
Appl. Math.); applied to LLM merging by Wang, Ye & Yin 2026, "Functionality-
Oriented LLM Merging on the Fisher-Rao Manifold" (arXiv:2603.04972).
Parameter names, defaults and behaviour follow mergekit's `karcher`: no base
(if a recipe names a base_model, mergekit counts it as one more model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _reduce
from ._geometry import work_dtype
from .registry import NON_NEGATIVE, Param, Range, merge_method


def karcher_mean(
    tensors: Sequence[torch.Tensor],
    alphas: Sequence[float],
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """Weighted Karcher mean of the tensors' directions, scaled by their mean norm."""
    shape = tensors[0].shape
    dtype = work_dtype(tensors[0])
    xs = [t.reshape(-1).to(dtype) for t in tensors]
    norms = [_reduce.norm(x) for x in xs]
    kept = [i for i, n in enumerate(norms) if n.item() > tol]
    if not kept:
        return torch.zeros_like(tensors[0])

    kept_sum = sum(float(alphas[i]) for i in kept)
    weights = [float(alphas[i]) / kept_sum for i in kept]
    units = [xs[i] / norms[i] for i in kept]

    mu = torch.zeros_like(units[0])
    for a, u in zip(weights, units):
        mu.add_(u, alpha=a)
    mu_norm = _reduce.norm(mu)
    mu = units[0].clone() if mu_norm.item() < tol else mu / mu_norm

    for _ in range(int(max_iter)):
        g = torch.zeros_like(mu)
        for a, u in zip(weights, units):
            cos = _reduce.dot(mu, u).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            # log map of u at mu, weighted
            g.add_((u - cos * mu) * (a * theta / torch.sin(theta)))
        g_norm = _reduce.norm(g)
        if g_norm.item() < tol:
            break
        mu = torch.cos(g_norm) * mu + torch.sin(g_norm) * (g / g_norm)
        mu_norm = _reduce.norm(mu)
        if mu_norm.item() > tol:
            mu = mu / mu_norm

    scale = sum(float(a) * n for a, n in zip(alphas, norms))
    return (mu * scale).reshape(shape).to(tensors[0].dtype)


@merge_method(
    "karcher",
    params=(
        Param("max_iter", default=10, kind="int", range=Range(1.0), help="maximum fixed-point iterations"),
        Param("tol", default=1e-5, range=NON_NEGATIVE, help="convergence tolerance (also the smallest norm that counts)"),
    ),
    base="none",
    summary="Riemannian (Karcher) mean of the models' directions, rescaled to their average norm",
    paper="Karcher 1977; Wang, Ye & Yin 2026, Functionality-Oriented LLM Merging on the Fisher-Rao Manifold (arXiv:2603.04972)",
    min_models=1,
    max_models=None,
)
def karcher(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].clone()
    n = len(tensors)
    return karcher_mean(tensors, [1.0 / n] * n, max_iter=max_iter, tol=float(tol))
