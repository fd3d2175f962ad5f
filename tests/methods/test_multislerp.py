"""multislerp: against a float64 transcription of the tangent-space recipe, plus properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from splice.methods import NO_DEFAULT, get_method

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(tensors, base=None, weight=None, **kw):
    weight = [1.0] * len(tensors) if weight is None else list(weight)
    return get_method("multislerp").fn(list(tensors), base, weight=weight, **kw)


def reference(tensors, base=None, weight=None, normalize_weights=True, eps=1e-8):
    """Project to the tangent space at the weighted mean direction, average there,
    map back with the exponential map, rescale by the weighted mean norm (float64)."""
    shape = tensors[0].shape
    x = np.stack([t.double().numpy().ravel() for t in tensors])
    if base is not None:
        x = x - base.double().numpy().ravel()
    w = np.array([1.0] * len(tensors) if weight is None else weight, dtype=np.float64)
    if len(tensors) == 1:
        return tensors[0].double().numpy()
    if normalize_weights:
        w = w / w.sum()
    norms = np.linalg.norm(x, axis=1)
    units = x / (norms[:, None] + eps)
    mean = (w[:, None] * units).sum(axis=0)
    mean = mean / np.linalg.norm(mean)
    tangents = units - (units @ mean)[:, None] * mean[None, :]
    v = (w[:, None] * tangents).sum(axis=0)
    r = np.linalg.norm(v) + eps
    out = (mean * math.cos(r) + v * math.sin(r) / r) * float((norms * w).sum())
    out = out.reshape(shape)
    if base is not None:
        out = out + base.double().numpy()
    return out


def close(actual, expected, rtol=1e-5, atol=1e-6):
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=rtol, atol=atol)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_registration_matches_mergekit():
    m = get_method("multislerp")
    assert m.base == "optional"
    assert (m.min_models, m.max_models) == (1, None)
    assert m.param_names == ["weight", "normalize_weights", "eps"]
    assert m.param("weight").per_model and m.param("weight").default is NO_DEFAULT
    assert m.param("normalize_weights").default is True
    assert m.param("eps").default == 1e-8


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize_weights", [True, False])
@pytest.mark.parametrize("shape", [(4, 4), (9,), (2, 3, 4)])
def test_matches_reference(n, with_base, normalize_weights, shape):
    xs = [rand(*shape, seed=10 + i) for i in range(n)]
    weight = [0.5 + i for i in range(n)]
    base = rand(*shape, seed=99) if with_base else None
    kw = dict(normalize_weights=normalize_weights)
    close(run(xs, base, weight, **kw), reference(xs, base, weight, **kw))


def test_two_models_equal_to_slerp_of_directions():
    # For two models the result is the great-circle point between the two
    # directions at the weighted mean norm; with equal weights the midpoint.
    a = torch.tensor([2.0, 0.0])
    b = torch.tensor([0.0, 4.0])
    out = run([a, b])
    close(out, [3.0 * math.sqrt(0.5), 3.0 * math.sqrt(0.5)])
    # weights 1:2 land where the weighted mean of the unit vectors points
    out = run([a, b], weight=[1.0, 2.0])
    direction = np.array([1.0, 2.0]) / math.sqrt(5.0)
    close(out, direction * (2.0 * 1 / 3 + 4.0 * 2 / 3))


def test_single_model_and_identical_models():
    x = rand(4, 4, seed=1)
    close(run([x]), x)
    close(run([x], base=rand(4, 4, seed=2)), x)
    close(run([x, x.clone(), x.clone()], weight=[0.2, 0.3, 0.5]), x)
    close(run([x, x.clone()], base=rand(4, 4, seed=3)), x)


def test_weight_endpoints():
    a, b = rand(4, 4, seed=4), rand(4, 4, seed=5)
    close(run([a, b], weight=[1.0, 0.0]), a)
    close(run([a, b], weight=[0.0, 1.0]), b)
    base = rand(4, 4, seed=6)
    close(run([a, b], base, weight=[0.0, 1.0]), b)


def test_parallel_vectors():
    x = rand(4, 4, seed=7)
    close(run([x, 3 * x]), 2 * x)  # same direction: mean norm along it
    # exactly cancelling directions: two models fall back to the weighted sum
    close(run([x, -x]), torch.zeros(4, 4))
    close(run([x, -x], weight=[1.0, 1.0], normalize_weights=False), torch.zeros(4, 4))
    # three cancelling models is an error, not garbage
    with pytest.raises(ValueError, match="the weighted directions cancel out"):
        run([x, -x, torch.zeros(4, 4)])


def test_one_d_and_zero_vectors():
    xs = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 3.0, 1.0]), torch.tensor([1.0, 1.0, -1.0])]
    close(run(xs, weight=[1.0, 2.0, 3.0]), reference(xs, weight=[1.0, 2.0, 3.0]))
    z = torch.zeros(4, 4)
    x = rand(4, 4, seed=8)
    out = run([x, z, 2 * x])  # a zero model adds no direction, only lowers the mean norm
    close(out, x)
    assert torch.isfinite(out).all()
    # base equal to a model: that model's task vector is zero
    close(run([x, rand(4, 4, seed=9)], base=x), reference([x, rand(4, 4, seed=9)], base=x))


def test_zero_weight_sum_is_an_error():
    a, b = rand(4, seed=10), rand(4, seed=11)
    with pytest.raises(ValueError, match=r"normalize_weights divides by the sum of the weights \[1.0, -1.0\], which is 0"):
        run([a, b], weight=[1.0, -1.0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_device(device, dtype):
    xs = [torch.randn(3, 5, dtype=dtype, device=device) for _ in range(3)]
    for base in (None, torch.randn(3, 5, dtype=dtype, device=device)):
        out = run(xs, base, [1.0, 2.0, 3.0])
        # a native-dtype method: stored bf16 in, float32 out (float64 stays float64)
        assert out.shape == (3, 5) and out.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
        assert out.device == xs[0].device
        assert torch.isfinite(out).all()


def test_inputs_not_modified():
    xs = [rand(4, 4, seed=20 + i) for i in range(3)]
    base = rand(4, 4, seed=30)
    copies = [x.clone() for x in xs + [base]]
    run(xs, base, [1.0, 2.0, 3.0])
    assert all(torch.equal(x, y) for x, y in zip(xs + [base], copies))


@pytest.mark.mergekit
def test_parity_with_mergekit(mergekit):

    xs = [rand(3, 5, seed=40 + i) for i in range(4)]
    base = rand(3, 5, seed=50)
    for with_base in (False, True):
        for normalize in (True, False):
            params = {"weight": [1.0, 0.5, 2.0, 0.25], "normalize_weights": normalize}
            tensors = xs if not with_base else [base] + xs
            expected = mergekit.merge(
                "mergekit.merge_methods.multislerp:multislerp", tensors, base_index=0 if with_base else None, parameters=params
            )
            actual = run(xs, base if with_base else None, **params)
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_models_all_equal_to_the_base_give_the_base():
    # MLP-only fine-tunes leave every other tensor equal to the base: no directions at all
    base = torch.randn(6, 4)
    out = run([base.clone(), base.clone(), base.clone()], base, weight=[1.0, 1.0, 1.0])
    assert torch.equal(out, base)


@pytest.mark.parametrize("with_base", [False, True])
def test_streamed_in_chunks_from_stored_bf16(with_base, monkeypatch):
    """Norms, the weighted direction sum and the scaling in STREAM_CHUNK pieces: the chunk size changes no bit, bf16
    inputs give what their float32 values give, and the result is the float64 formula's."""
    from splice.methods import multislerp as multislerp_module
    from splice.methods._sizes import SUM_BLOCK

    base = rand(700, 1001, seed=3)  # several chunks and a ragged last one
    xs = [(base + 0.1 * rand(700, 1001, seed=4 + i)).bfloat16() for i in range(3)]
    base = base.bfloat16() if with_base else None
    out = run(xs, base, [0.2, 0.3, 0.5])
    assert out.dtype == torch.float32
    f32 = ([x.float() for x in xs], base.float() if base is not None else None)
    assert torch.equal(out, run(*f32, [0.2, 0.3, 0.5]))
    monkeypatch.setattr(multislerp_module, "STREAM_CHUNK", 3 * SUM_BLOCK)
    assert torch.equal(out, run(xs, base, [0.2, 0.3, 0.5]))
    close(out, reference(*f32, [0.2, 0.3, 0.5]))
