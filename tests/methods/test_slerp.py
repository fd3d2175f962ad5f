"""slerp: against a plain float64 transcription of the formula, plus properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from splice.methods import NO_DEFAULT, get_method

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(base, other, t):
    return get_method("slerp").fn([other], base, t=t)


def reference(base: torch.Tensor, other: torch.Tensor, t: float) -> np.ndarray:
    """SLERP as written in Shoemake / mergekit, in float64 numpy."""
    v0 = base.double().numpy().ravel()
    v1 = other.double().numpy().ravel()
    u0 = v0 / np.linalg.norm(v0) if np.linalg.norm(v0) > 1e-8 else v0
    u1 = v1 / np.linalg.norm(v1) if np.linalg.norm(v1) > 1e-8 else v1
    dot = float(np.clip(np.sum(u0 * u1), -1.0, 1.0))
    if abs(dot) > 0.9995:
        out = (1 - t) * v0 + t * v1
    else:
        theta = math.acos(dot)
        out = math.sin((1 - t) * theta) / math.sin(theta) * v0 + math.sin(t * theta) / math.sin(theta) * v1
    return out.reshape(base.shape)


def close(actual: torch.Tensor, expected, rtol=1e-5, atol=1e-6):
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=rtol, atol=atol)


def test_registration_matches_mergekit():
    m = get_method("slerp")
    assert m.base == "required"
    assert (m.min_models, m.max_models) == (1, 1)
    assert m.param_names == ["t"]
    t = m.param("t")
    assert t.default is NO_DEFAULT and not t.per_model


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0, -0.3, 1.4])
@pytest.mark.parametrize("shape", [(4, 4), (16,), (2, 3, 5)])
def test_matches_reference(t, shape):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=g)
    other = torch.randn(shape, generator=g)
    close(run(base, other, t), reference(base, other, t))


def test_known_value_orthogonal_unit_vectors():
    # Quarter circle: at t=0.5 the result is (cos 45, sin 45), norm 1 (lerp would give 0.707).
    e0 = torch.tensor([1.0, 0.0])
    e1 = torch.tensor([0.0, 1.0])
    out = run(e0, e1, 0.5)
    close(out, [math.sqrt(0.5), math.sqrt(0.5)])
    out = run(e0, e1, 1 / 3)
    close(out, [math.cos(math.pi / 6), math.sin(math.pi / 6)])


def test_endpoints():
    g = torch.Generator().manual_seed(2)
    base, other = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    close(run(base, other, 0.0), base)
    close(run(base, other, 1.0), other)


def test_identical_models_return_that_model():
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    for t in (0.0, 0.3, 1.0):
        close(run(x, x.clone(), t), x)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 1.0])
def test_parallel_and_antiparallel_fall_back_to_linear(t):
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(4))
    close(run(x, 2 * x, t), (1 + t) * x)  # parallel, different norms
    close(run(x, -x, t), (1 - 2 * t) * x)  # antiparallel
    near = x + 1e-3 * torch.randn(4, 4, generator=torch.Generator().manual_seed(5))
    close(run(x, near, t), (1 - t) * x + t * near)  # cos > 0.9995


def test_one_d_and_scalar_and_empty():
    a, b = torch.tensor([3.0, 0.0, 1.0]), torch.tensor([0.0, 2.0, 1.0])
    close(run(a, b, 0.4), reference(a, b, 0.4))
    close(run(torch.tensor(2.0), torch.tensor(5.0), 0.5), 3.5)  # parallel scalars: linear
    empty = torch.empty(0, 4)
    assert run(empty, empty, 0.5).shape == (0, 4)


def test_zero_vectors_stay_finite():
    z = torch.zeros(4, 4)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(6))
    close(run(z, z, 0.5), z)
    # a zero vector has no direction; like mergekit it is treated as orthogonal
    # to the other, so the result is sin(t*pi/2) * other
    close(run(z, x, 0.5), math.sin(math.pi / 4) * x)
    close(run(x, z, 0.25), reference(x, z, 0.25))
    assert torch.isfinite(run(z, x, 0.3)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_device(device, dtype):
    base = torch.randn(3, 5, dtype=dtype, device=device)
    other = torch.randn(3, 5, dtype=dtype, device=device)
    out = run(base, other, 0.3)
    # a native-dtype method: stored bf16 in, float32 out (float64 stays float64)
    assert out.shape == base.shape and out.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype) and out.device == base.device
    assert torch.isfinite(out).all()


def test_inputs_not_modified():
    g = torch.Generator().manual_seed(7)
    base, other = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    b0, o0 = base.clone(), other.clone()
    run(base, other, 0.3)
    assert torch.equal(base, b0) and torch.equal(other, o0)


def test_errors():
    x = torch.ones(4)
    method = get_method("slerp")  # the registry's checks, run before the function
    with pytest.raises(ValueError, match="needs a base model"):
        method([x], None, t=0.5)
    with pytest.raises(ValueError, match=r"needs exactly 1 model tensor\(s\) besides the base, got 2"):
        method([x, x], x, t=0.5)
    with pytest.raises(ValueError, match=r"tensors have different shapes \[\(3,\), \(4,\)\]"):
        method([torch.ones(3)], x, t=0.5)


@pytest.mark.mergekit
def test_parity_with_mergekit(mergekit):

    g = torch.Generator().manual_seed(8)
    for shape in [(4, 4), (7,), (3, 2, 5)]:
        base, other = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        for pair in [(base, other), (base, 2 * base), (base, base + 1e-3 * other)]:
            for t in (0.0, 0.3, 1.0):
                expected = mergekit.merge("mergekit.merge_methods.slerp:slerp_merge_method", list(pair), base_index=0, parameters={"t": t})
                torch.testing.assert_close(run(pair[0], pair[1], t), expected, rtol=1e-5, atol=1e-6)


def test_streamed_in_chunks_from_stored_bf16_and_closer_to_float64_than_a_float32_norm(monkeypatch):
    """Two passes of STREAM_CHUNK elements (sums, then the combine), straight from bf16: the chunk size changes no bit,
    bf16 inputs give what their float32 values give, and the norms' exactly rounded partial sums keep the result
    closer to float64 than torch's float32 vector_norm does on a few million elements."""
    from splice.methods import slerp as slerp_module
    from splice.methods._sizes import SUM_BLOCK

    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 2049, generator=g) * 0.02  # several chunks and a ragged last one
    b = a + 0.01 * torch.randn(1000, 2049, generator=g)
    a16, b16 = a.bfloat16(), b.bfloat16()
    out = run(a16, b16, 0.3)
    assert out.dtype == torch.float32
    assert torch.equal(out, run(a16.float(), b16.float(), 0.3))
    monkeypatch.setattr(slerp_module, "STREAM_CHUNK", 3 * SUM_BLOCK)
    assert torch.equal(out, run(a16, b16, 0.3))
    err = (out.double() - torch.as_tensor(reference(a16.float(), b16.float(), 0.3))).abs().max()
    assert err < 1e-7  # a float32 vector_norm of the whole tensor puts this near 1e-6
