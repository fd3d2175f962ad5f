"""nearswap: against an element-by-element transcription, plus properties."""

from __future__ import annotations

import pytest
import torch

from splice.methods import NO_DEFAULT, get_method

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(base, other, t):
    return get_method("nearswap").fn([other], base, t=t)


def reference(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    a = base.double().flatten().tolist()
    b = other.double().flatten().tolist()
    out = []
    for x, y in zip(a, b):
        w = min(max(t / max(abs(x - y), 1e-6), 0.0), 1.0)
        out.append(w * y + (1 - w) * x)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double().cpu(), torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_registration_matches_mergekit():
    m = get_method("nearswap")
    assert m.base == "required"
    assert (m.min_models, m.max_models) == (1, 1)
    assert m.param_names == ["t"]
    assert m.param("t").default is NO_DEFAULT and not m.param("t").per_model


@pytest.mark.parametrize("t", [0.0, 1e-3, 0.05, 0.5, 2.0, 100.0])
@pytest.mark.parametrize("shape", [(4, 4), (9,), (2, 3, 4)])
def test_matches_reference(t, shape):
    base = rand(*shape, seed=1)
    other = base + 0.3 * rand(*shape, seed=2)
    close(run(base, other, t), reference(base, other, t))


def test_known_values():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    other = torch.tensor([0.05, 0.2, -0.4, 1.0])
    # t = 0.1: |diff| 0.05 <= t -> swap; 0.2 -> w = 0.5; 0.4 -> w = 0.25; equal -> unchanged
    close(run(base, other, 0.1), [0.05, 0.1, -0.1, 1.0])


def test_endpoints_and_identical_models():
    base, other = rand(4, 4, seed=3), rand(4, 4, seed=4)
    assert torch.equal(run(base, other, 0.0), base)  # t = 0 keeps the base
    close(run(base, other, 1e9), other)  # huge t swaps everything
    x = rand(4, 4, seed=5)
    close(run(x, x.clone(), 0.5), x)
    assert torch.equal(run(base, other, -1.0), base)  # negative t: weight clamps to 0


def test_one_d_and_zeros():
    z = torch.zeros(5)
    close(run(z, z, 0.3), z)
    x = torch.tensor([0.1, -2.0, 0.0, 5.0, 1e-8])
    close(run(z, x, 0.5), reference(z, x, 0.5))
    close(run(x, z, 0.5), reference(x, z, 0.5))
    assert torch.isfinite(run(x, x, 1e-3)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_device(device, dtype):
    base = torch.randn(3, 5, dtype=dtype, device=device)
    other = torch.randn(3, 5, dtype=dtype, device=device)
    out = run(base, other, 0.5)
    # a native-dtype method: stored bf16 in, float32 out (float64 stays float64)
    assert out.shape == base.shape and out.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    assert out.device == base.device
    assert torch.isfinite(out).all()


def test_inputs_not_modified():
    base, other = rand(4, 4, seed=6), rand(4, 4, seed=7)
    b0, o0 = base.clone(), other.clone()
    run(base, other, 0.5)
    assert torch.equal(base, b0) and torch.equal(other, o0)


def test_errors():
    x = torch.ones(4)
    method = get_method("nearswap")  # the registry's checks, run before the function
    with pytest.raises(ValueError, match="needs a base model"):
        method([x], None, t=0.5)
    with pytest.raises(ValueError, match=r"needs exactly 1 model tensor\(s\) besides the base, got 2"):
        method([x, x], x, t=0.5)


@pytest.mark.mergekit
def test_parity_with_mergekit(mergekit):

    base = rand(3, 5, seed=8)
    other = base + 0.2 * rand(3, 5, seed=9)
    for t in (0.0, 0.01, 0.1, 1.0):
        expected = mergekit.merge("mergekit.merge_methods.nearswap:nearswap_merge", [base, other], base_index=0, parameters={"t": t})
        torch.testing.assert_close(run(base, other, t), expected, rtol=1e-5, atol=1e-6)


def test_chunked_from_stored_bf16_gives_the_whole_tensor_bits(monkeypatch):
    """STREAM_CHUNK elements at a time from bf16: the bits of one whole-tensor pass over the float32 values."""
    from splice.methods import nearswap as nearswap_module

    base = rand(700, 1001, seed=3)
    other = base + 0.01 * rand(700, 1001, seed=4)
    base, other = base.bfloat16(), other.bfloat16()
    out = run(base, other, 0.004)
    a, b = base.float(), other.float()
    whole = torch.lerp(a, b, (0.004 / (a - b).abs().clamp(min=1e-6)).clamp(0.0, 1.0))
    assert out.dtype == torch.float32 and torch.equal(out, whole)
    monkeypatch.setattr(nearswap_module, "STREAM_CHUNK", 3 * 16384 + 17)  # chunks off the vector width
    assert torch.equal(run(base, other, 0.004), whole)
