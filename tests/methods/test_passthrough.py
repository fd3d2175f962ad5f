"""passthrough: copy one model's tensor, optionally scaled."""

from __future__ import annotations

import pytest
import torch

from splice.methods import get_method

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(x, **kw):
    return get_method("passthrough")([x], None, **kw)  # through the registry: scalars become per-model lists


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_registration_matches_mergekit():
    m = get_method("passthrough")
    assert m.base == "none"
    assert (m.min_models, m.max_models) == (1, 1)
    assert m.param_names == ["scale"]
    scale = m.param("scale")
    assert scale.per_model and scale.default is None


@pytest.mark.parametrize("shape", [(4, 4), (7,), (), (2, 3, 4), (0, 3)])
def test_copies_unscaled(shape):
    x = rand(*shape, seed=1)
    assert torch.equal(run(x), x)
    assert torch.equal(run(x, scale=[None]), x)
    assert torch.equal(run(x, scale=None), x)


def test_scale():
    x = rand(4, 4, seed=2)
    torch.testing.assert_close(run(x, scale=[2.5]), 2.5 * x)
    torch.testing.assert_close(run(x, scale=0.5), 0.5 * x)  # scalar form, as merge_tensors may pass
    assert torch.equal(run(x, scale=[0.0]), torch.zeros(4, 4))  # zeroing a projection
    assert torch.equal(run(x, scale=[1.0]), x)
    z = torch.zeros(5)
    assert torch.equal(run(z, scale=[3.0]), z)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_device(device, dtype):
    x = torch.randn(3, 5, dtype=dtype, device=device)
    for scale in (None, [2.0]):
        out = run(x, scale=scale)
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device


def test_inputs_not_modified():
    x = rand(4, 4, seed=3)
    x0 = x.clone()
    run(x, scale=[3.0])
    assert torch.equal(x, x0)


def test_errors():
    x = torch.ones(4)
    method = get_method("passthrough")  # the registry's checks, run before the function
    with pytest.raises(ValueError, match=r"needs exactly 1 model tensor\(s\) besides the base, got 2"):
        method([x, x], None, scale=[None, None])
    with pytest.raises(ValueError, match="parameter 'scale' has 2 values for 1 models"):
        method([x], None, scale=[1.0, 2.0])


@pytest.mark.mergekit
def test_parity_with_mergekit(mergekit):

    x = rand(3, 5, seed=4)
    for scale in (None, 0.0, 1.7):
        expected = mergekit.merge("mergekit.merge_methods.passthrough:passthrough_merge_method", [x], parameters={"scale": [scale]})
        torch.testing.assert_close(run(x, scale=[scale]), expected)
