"""model_stock: against a float64 transcription of the paper's equation, plus properties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from splice.methods import get_method

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(tensors, base, **kw):
    return get_method("model_stock").fn(list(tensors), base, **kw)


def ratio(vectors_from_base) -> float:
    """t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the offsets."""
    d = vectors_from_base
    n = len(d)
    cosines = []
    for x, y in itertools.combinations(d, 2):
        c = float(x @ y) / max(float(np.linalg.norm(x) * np.linalg.norm(y)), 1e-6)
        cosines.append(min(max(c, -1.0), 1.0))
    cos = sum(cosines) / len(cosines)
    denom = 1 + (n - 1) * cos
    return 0.0 if abs(denom) < 1e-6 else n * cos / denom


def reference(tensors, base, filter_wise=False):
    w0 = base.double().numpy()
    ws = [t.double().numpy() for t in tensors]
    avg = sum(ws) / len(ws)
    if not filter_wise:
        t = ratio([w.ravel() - w0.ravel() for w in ws])
        return t * avg + (1 - t) * w0
    if w0.ndim <= 1:
        t = ratio([w.ravel() - w0.ravel() for w in ws])
        return t * avg + (1 - t) * w0
    out = np.empty_like(w0)
    for idx in np.ndindex(w0.shape[:-1]):  # one ratio per row (last axis)
        t = ratio([w[idx] - w0[idx] for w in ws])
        out[idx] = t * avg[idx] + (1 - t) * w0[idx]
    return out


def close(actual, expected, rtol=1e-5, atol=1e-6):
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=rtol, atol=atol)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def finetunes(base, n, spread=0.1, shared=0.1, seed=0):
    """n models base + shared + noise: offsets with a positive mutual cosine."""
    common = shared * rand(*base.shape, seed=seed)
    return [base + common + spread * rand(*base.shape, seed=seed + 1 + i) for i in range(n)]


def test_registration_matches_mergekit():
    m = get_method("model_stock")
    assert m.base == "required"
    assert (m.min_models, m.max_models) == (2, None)
    assert m.param_names == ["filter_wise"]
    assert m.param("filter_wise").default is False and not m.param("filter_wise").per_model


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(4, 4), (8,), (2, 3, 4)])
def test_matches_reference(n, filter_wise, shape):
    base = rand(*shape, seed=100)
    xs = finetunes(base, n, seed=n)
    close(run(xs, base, filter_wise=filter_wise), reference(xs, base, filter_wise=filter_wise))


def test_known_ratio_two_models():
    # offsets at 60 degrees: cos = 0.5, t = 2 * 0.5 / 1.5 = 2/3 (paper, eq. 3 with N = 2)
    base = torch.zeros(2)
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.5, 3**0.5 / 2])
    close(run([a, b], base), (2 / 3) * (a + b) / 2)


def test_filter_wise_uses_one_ratio_per_row():
    base = torch.zeros(2, 2)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # row 0 aligned (t=1), row 1 orthogonal (t=0)
    close(run([a, b], base, filter_wise=True), [[1.0, 0.0], [0.0, 0.0]])
    # over the whole tensor: cos = 1/2 -> t = 2/3
    close(run([a, b], base), (2 / 3) * (a + b) / 2)


def test_identical_models():
    x = rand(4, 4, seed=1)
    close(run([x, x.clone()], x), x)  # everything equals the base
    base = rand(4, 4, seed=2)
    close(run([x, x.clone(), x.clone()], base), x)  # identical fine-tunes: cos = 1, t = 1
    close(run([x, x.clone()], base, filter_wise=True), x)


def test_degenerate_offsets_keep_the_base():
    base = rand(4, 4, seed=3)
    d = rand(4, 4, seed=4)
    close(run([base + d, base - d], base), base)  # cos = -1, N = 2: singular -> base
    e = torch.zeros(4, 4)
    e[0, 0] = 1.0
    f = torch.zeros(4, 4)
    f[1, 1] = 1.0
    close(run([base + e, base + f], base), base)  # orthogonal offsets: t = 0


def test_one_d_and_zero_offsets():
    base = torch.tensor([1.0, 2.0, 3.0])
    xs = [base + torch.tensor([0.1, 0.2, 0.0]), base + torch.tensor([0.2, 0.1, 0.1]), base + torch.tensor([0.0, 0.3, 0.1])]
    for fw in (False, True):
        close(run(xs, base, filter_wise=fw), reference(xs, base, filter_wise=fw))
    # one model equal to the base: its offset is zero, cos with it counts as 0
    x = rand(4, 4, seed=5)
    xs = [x.clone(), x + 0.1, x + 0.2]
    out = run(xs, x)
    assert torch.isfinite(out).all()
    close(out, reference(xs, x))
    z = torch.zeros(4, 4)
    close(run([z, z], z, filter_wise=True), z)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_device(device, dtype):
    base = torch.randn(3, 5, dtype=dtype, device=device)
    xs = [torch.randn(3, 5, dtype=dtype, device=device) for _ in range(3)]
    for fw in (False, True):
        out = run(xs, base, filter_wise=fw)
        # a native-dtype method: stored bf16 in, float32 out (float64 stays float64)
        assert out.shape == base.shape and out.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
        assert out.device == base.device
        assert torch.isfinite(out).all()


def test_inputs_not_modified():
    base = rand(4, 4, seed=6)
    xs = finetunes(base, 3)
    copies = [x.clone() for x in xs + [base]]
    run(xs, base, filter_wise=True)
    assert all(torch.equal(x, y) for x, y in zip(xs + [base], copies))


def test_errors():
    x = torch.ones(4)
    method = get_method("model_stock")  # the registry's checks, run before the function
    with pytest.raises(ValueError, match="needs a base model"):
        method([x, x], None)
    with pytest.raises(ValueError, match=r"needs at least 2 model tensor\(s\) besides the base, got 1"):
        method([x], x)


@pytest.mark.mergekit
def test_parity_with_mergekit(mergekit):

    for shape in [(3, 5), (6,)]:
        base = rand(*shape, seed=7)
        xs = finetunes(base, 3, seed=8)
        for fw in (False, True):
            expected = mergekit.merge(
                "mergekit.merge_methods.model_stock:model_stock_merge_method", [base] + xs, base_index=0, parameters={"filter_wise": fw}
            )
            torch.testing.assert_close(run(xs, base, filter_wise=fw), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_streamed_in_chunks_from_stored_bf16(filter_wise, monkeypatch):
    """Sums in STREAM_CHUNK pieces (per row: blocks of whole rows), then the combine: the chunk size changes no bit,
    bf16 inputs give what their float32 values give, and the result is the float64 formula's."""
    from splice.methods import model_stock as ms
    from splice.methods._sizes import SUM_BLOCK

    base = rand(700, 1001, seed=3)  # several chunks, rows that straddle them, a ragged last one
    ts = [t.bfloat16() for t in finetunes(base, 3, seed=4)]
    base = base.bfloat16()
    out = run(ts, base, filter_wise=filter_wise)
    assert out.dtype == torch.float32
    assert torch.equal(out, run([t.float() for t in ts], base.float(), filter_wise=filter_wise))
    monkeypatch.setattr(ms, "STREAM_CHUNK", 3 * SUM_BLOCK + 17)
    assert torch.equal(out, run(ts, base, filter_wise=filter_wise))
    close(out, reference([t.float() for t in ts], base.float(), filter_wise=filter_wise))
