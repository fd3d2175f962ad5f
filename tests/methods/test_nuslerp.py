"""nuslerp: against a plain float64 per-vector transcription, plus properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from splice.methods import NO_DEFAULT, get_method

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(a, b, base=None, weight=(1.0, 1.0), **kw):
    return get_method("nuslerp").fn([a, b], base, weight=list(weight), **kw)


def slerp_vec(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    u0 = v0 / max(np.linalg.norm(v0), 1e-7)
    u1 = v1 / max(np.linalg.norm(v1), 1e-7)
    cos = float(np.clip(np.dot(u0, u1), -1.0, 1.0))
    if 1 - cos * cos <= 1e-16:
        return (1 - t) * v0 + t * v1
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def reference(a, b, base=None, weight=(1.0, 1.0), nuslerp_row_wise=False, nuslerp_flatten=True):
    """mergekit's NuSLERP written out with explicit loops over vectors, float64 (weights not summing to 0)."""
    w0, w1 = weight
    t = w1 / (w0 + w1)
    x = a.double().numpy()
    y = b.double().numpy()
    if base is not None:
        x = x - base.double().numpy()
        y = y - base.double().numpy()
    if nuslerp_flatten or x.ndim <= 1:
        out = slerp_vec(t, x.ravel(), y.ravel()).reshape(x.shape)
    elif nuslerp_row_wise:  # vectors along the first axis
        out = np.empty_like(x)
        for idx in np.ndindex(x.shape[1:]):
            sl = (slice(None),) + idx
            out[sl] = slerp_vec(t, x[sl], y[sl])
    else:  # vectors along the last axis
        out = np.empty_like(x)
        for idx in np.ndindex(x.shape[:-1]):
            out[idx] = slerp_vec(t, x[idx], y[idx])
    if base is not None:
        out = out + base.double().numpy()
    return out


def close(actual, expected, rtol=1e-5, atol=1e-6):
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=rtol, atol=atol)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_registration_matches_mergekit():
    m = get_method("nuslerp")
    assert m.base == "optional"
    assert (m.min_models, m.max_models) == (2, 2)
    assert m.param_names == ["weight", "nuslerp_row_wise", "nuslerp_flatten"]
    assert m.param("weight").per_model and m.param("weight").default is NO_DEFAULT
    assert m.param("nuslerp_row_wise").default is False and not m.param("nuslerp_row_wise").per_model
    assert m.param("nuslerp_flatten").default is True and not m.param("nuslerp_flatten").per_model


@pytest.mark.parametrize("row_wise", [False, True])
@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("weight", [(1.0, 1.0), (0.2, 0.8), (3.0, 1.0), (1.0, -1.0)])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (2, 3, 4)])
def test_matches_reference(row_wise, flatten, weight, with_base, shape):
    a, b = rand(*shape, seed=1), rand(*shape, seed=2)
    base = rand(*shape, seed=3) if with_base else None
    kw = dict(nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)
    if sum(weight) == 0:  # mergekit takes t = 0.5 there; splice refuses a t the weights do not give
        with pytest.raises(ValueError, match=r"the weights \[1.0, -1.0\] sum to 0"):
            run(a, b, base, weight, **kw)
        return
    close(run(a, b, base, weight, **kw), reference(a, b, base, weight, **kw))


def test_rows_are_independent():
    # rows 0: orthogonal unit vectors, row 1: parallel -> slerp and lerp side by side
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [3.0, 3.0]])
    out = run(a, b, nuslerp_flatten=False)
    close(out, [[math.sqrt(0.5), math.sqrt(0.5)], [2.0, 2.0]])
    # row_wise: the same vectors laid out as columns
    out = run(a.T.contiguous(), b.T.contiguous(), nuslerp_flatten=False, nuslerp_row_wise=True)
    close(out, [[math.sqrt(0.5), 2.0], [math.sqrt(0.5), 2.0]])


def test_t_from_weights_and_endpoints():
    a, b = rand(4, 4, seed=4), rand(4, 4, seed=5)
    close(run(a, b, weight=(1.0, 0.0)), a)  # t = 0
    close(run(a, b, weight=(0.0, 2.0)), b)  # t = 1
    with pytest.raises(ValueError, match=r"t = w1 / \(w0 \+ w1\), and the weights \[0.0, 0.0\] sum to 0"):
        run(a, b, weight=(0.0, 0.0))  # mergekit: t = 0.5, an interpolation the weights do not ask for
    base = rand(4, 4, seed=6)
    close(run(a, b, base, weight=(1.0, 0.0)), a)
    close(run(a, b, base, weight=(0.0, 1.0)), b)


def test_identical_models_return_that_model():
    x = rand(4, 4, seed=7)
    for kw in ({}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}):
        close(run(x, x.clone(), **kw), x)
        close(run(x, x.clone(), rand(4, 4, seed=8), **kw), x)


def test_parallel_falls_back_to_linear():
    x = rand(4, 4, seed=9)
    close(run(x, 3 * x, weight=(3.0, 1.0)), 0.75 * x + 0.25 * 3 * x)
    close(run(x, -x), torch.zeros(4, 4))


def test_one_d_and_zero_vectors():
    a, b = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 1.0, 4.0])
    for kw in ({}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}):
        close(run(a, b, **kw), reference(a, b, **kw))
    z = torch.zeros(4, 4)
    close(run(z, z), z)
    x = rand(4, 4, seed=10)
    out = run(z, x)  # a zero vector counts as orthogonal: sin(t*pi/2) * x
    close(out, math.sin(math.pi / 4) * x)
    # zero rows among non-zero rows, and a base equal to one model (zero task vector)
    a = x.clone()
    a[1] = 0
    assert torch.isfinite(run(a, x, nuslerp_flatten=False)).all()
    close(run(x, rand(4, 4, seed=11), base=x), reference(x, rand(4, 4, seed=11), base=x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_device(device, dtype):
    a, b, c = (torch.randn(3, 5, dtype=dtype, device=device) for _ in range(3))
    for base in (None, c):
        for flatten in (True, False):
            out = run(a, b, base, nuslerp_flatten=flatten)
            # a native-dtype method: stored bf16 in, float32 out (float64 stays float64)
            assert out.shape == a.shape and out.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
            assert out.device == a.device
            assert torch.isfinite(out).all()


def test_inputs_not_modified():
    a, b, c = rand(4, 4, seed=12), rand(4, 4, seed=13), rand(4, 4, seed=14)
    copies = [x.clone() for x in (a, b, c)]
    run(a, b, c, nuslerp_flatten=False, nuslerp_row_wise=True)
    assert all(torch.equal(x, y) for x, y in zip((a, b, c), copies))


def test_errors():
    x = torch.ones(4)
    method = get_method("nuslerp")  # the registry's checks, run before the function
    with pytest.raises(ValueError, match=r"needs exactly 2 model tensor\(s\) besides the base, got 1"):
        method([x], None, weight=[1.0])
    with pytest.raises(ValueError, match=r"needs exactly 2 model tensor\(s\) besides the base, got 3"):
        method([x, x, x], None, weight=[1.0, 1.0, 1.0])


@pytest.mark.mergekit
def test_parity_with_mergekit(mergekit):

    a, b, c = rand(3, 5, seed=15), rand(3, 5, seed=16), rand(3, 5, seed=17)
    for base in (None, c):
        for row_wise in (False, True):
            for flatten in (False, True):
                params = {"weight": [0.3, 0.7], "nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
                tensors = [a, b] if base is None else [base, a, b]
                expected = mergekit.merge(
                    "mergekit.merge_methods.nuslerp:nuslerp_merge_method",
                    tensors,
                    base_index=None if base is None else 0,
                    parameters=params,
                )
                actual = run(a, b, base, **params)
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_base", [False, True])
def test_flat_is_streamed_in_chunks_from_stored_bf16(with_base, monkeypatch):
    """Norms, unit dot product and combine in STREAM_CHUNK pieces: the chunk size changes no bit, bf16 inputs give
    what their float32 values give, and the result is the float64 formula's."""
    from splice.methods import nuslerp as nuslerp_module
    from splice.methods._sizes import SUM_BLOCK

    base = rand(700, 1001, seed=3)  # several chunks and a ragged last one
    a, b = base + 0.1 * rand(700, 1001, seed=4), base + 0.1 * rand(700, 1001, seed=5)
    a, b, base = a.bfloat16(), b.bfloat16(), (base.bfloat16() if with_base else None)
    out = run(a, b, base, weight=(0.4, 0.6))
    assert out.dtype == torch.float32
    f32 = [x.float() if x is not None else None for x in (a, b, base)]
    assert torch.equal(out, run(*f32, weight=(0.4, 0.6)))
    monkeypatch.setattr(nuslerp_module, "STREAM_CHUNK", 3 * SUM_BLOCK)
    assert torch.equal(out, run(a, b, base, weight=(0.4, 0.6)))
    close(out, reference(*f32, weight=(0.4, 0.6)))
