"""karcher: against a float64 transcription of the fixed-point iteration, plus properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from splice.methods import get_method

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(tensors, **kw):
    return get_method("karcher").fn(list(tensors), None, **kw)


def reference(tensors, max_iter=10, tol=1e-5):
    """Equal-weight Karcher mean on the unit sphere times the mean norm, float64."""
    shape = tensors[0].shape
    n = len(tensors)
    if n == 1:
        return tensors[0].double().numpy()
    xs = [t.double().numpy().ravel() for t in tensors]
    norms = [float(np.linalg.norm(x)) for x in xs]
    keep = [i for i in range(n) if norms[i] > tol]
    if not keep:
        return np.zeros(shape)
    a = np.array([1.0 / len(keep)] * len(keep))
    u = [xs[i] / norms[i] for i in keep]
    mu = sum(ai * ui for ai, ui in zip(a, u))
    mu = u[0].copy() if np.linalg.norm(mu) < tol else mu / np.linalg.norm(mu)
    for _ in range(max_iter):
        g = np.zeros_like(mu)
        for ai, ui in zip(a, u):
            c = float(np.clip(mu @ ui, -1, 1))
            th = math.acos(c)
            if th < tol:
                continue
            g += ai * th / math.sin(th) * (ui - c * mu)
        gn = float(np.linalg.norm(g))
        if gn < tol:
            break
        mu = math.cos(gn) * mu + math.sin(gn) * g / gn
        if np.linalg.norm(mu) > tol:
            mu = mu / np.linalg.norm(mu)
    return (mu * (sum(norms) / n)).reshape(shape)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=rtol, atol=atol)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_registration_matches_mergekit():
    m = get_method("karcher")
    assert m.base == "none"
    assert (m.min_models, m.max_models) == (1, None)
    assert m.param_names == ["max_iter", "tol"]
    assert m.param("max_iter").default == 10 and m.param("tol").default == 1e-5
    assert not any(p.per_model for p in m.params)


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("shape", [(4, 4), (10,), (2, 3, 4)])
@pytest.mark.parametrize("max_iter", [1, 10])
def test_matches_reference(n, shape, max_iter):
    xs = [rand(*shape, seed=i) for i in range(n)]
    close(run(xs, max_iter=max_iter), reference(xs, max_iter=max_iter))


def test_two_models_give_the_geodesic_midpoint():
    # Karcher mean of two points = midpoint of the great-circle arc between them.
    a = torch.tensor([2.0, 0.0, 0.0])
    b = torch.tensor([0.0, 4.0, 0.0])
    close(run([a, b]), [3 * math.sqrt(0.5), 3 * math.sqrt(0.5), 0.0])
    a, b = rand(4, 4, seed=1), rand(4, 4, seed=2)
    ua, ub = a / a.norm(), b / b.norm()
    mid = (ua + ub) / (ua + ub).norm()
    close(run([a, b]), mid * (a.norm() + b.norm()) / 2)


def test_converged_mean_has_zero_gradient():
    # At the Karcher mean the weighted log maps of all points sum to zero.
    xs = [rand(8, seed=10 + i) for i in range(4)]
    out = run(xs, max_iter=200, tol=1e-7).double()
    mu = out / out.norm()
    g = torch.zeros_like(mu)
    for x in xs:
        u = x.double() / x.double().norm()
        c = torch.clamp(mu @ u, -1, 1)
        th = torch.arccos(c)
        g += th / torch.sin(th) * (u - c * mu)
    assert g.norm() < 1e-4
    close(out.norm(), sum(x.norm() for x in xs) / 4)


def test_single_and_identical_models():
    x = rand(4, 4, seed=3)
    close(run([x]), x)
    close(run([x, x.clone(), x.clone()]), x)


def test_parallel_vectors_average_norm():
    x = rand(4, 4, seed=4)
    close(run([x, 3 * x]), 2 * x)


def test_zero_vectors():
    z = torch.zeros(4, 4)
    close(run([z, z]), z)
    x = rand(4, 4, seed=5)
    # a zero model has no direction; it still counts in the average norm
    close(run([x, z]), x / 2)
    xs = [x, z, rand(4, 4, seed=6)]
    out = run(xs)
    assert torch.isfinite(out).all()
    close(out, reference(xs))


def test_one_d():
    xs = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 3.0, 1.0]), torch.tensor([1.0, 1.0, -1.0])]
    close(run(xs), reference(xs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_device(device, dtype):
    xs = [torch.randn(3, 5, dtype=dtype, device=device) for _ in range(3)]
    out = run(xs)
    assert out.shape == (3, 5) and out.dtype == dtype and out.device == xs[0].device
    assert torch.isfinite(out).all()


def test_inputs_not_modified():
    xs = [rand(4, 4, seed=20 + i) for i in range(3)]
    copies = [x.clone() for x in xs]
    run(xs)
    assert all(torch.equal(x, y) for x, y in zip(xs, copies))


@pytest.mark.mergekit
def test_parity_with_mergekit(mergekit):

    xs = [rand(3, 5, seed=40 + i) for i in range(4)]
    for params in ({}, {"max_iter": 2}, {"max_iter": 50, "tol": 1e-7}):
        expected = mergekit.merge("mergekit.merge_methods.karcher:karcher_merge_method", xs, parameters=params)
        torch.testing.assert_close(run(xs, **params), expected, rtol=1e-5, atol=1e-6)
