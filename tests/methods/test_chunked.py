"""The chunked path for large CPU tensors gives the whole-tensor path's bits."""

import pytest
import torch

from splice.methods import _chunked
from splice.methods._sizes import TORCH_CHUNK
from splice.methods._sparsify import SORT_LIMIT, magnitude_
from splice.methods.task_arithmetic import merge_task_vectors


def _models(n, k=3, quantized=False, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    outs = []
    for _ in range(k):
        d = 0.02 * torch.randn(n, generator=g)
        if quantized:  # few distinct magnitudes: many ties at every threshold
            d = (d * 200).round() / 200
        outs.append((base + d).to(dtype))
    return outs, base.to(dtype)


def _whole(tensors, base, **kw):
    """The whole-tensor path, forced by a sparsify callback (float32 inputs)."""
    dens = kw.pop("trim_density", None)
    ts = [t.float() for t in tensors]
    sp = (lambda i, d, s: magnitude_(d, dens[i], False, scratch=s)) if dens else (lambda i, d, s: d)
    return merge_task_vectors(ts, base.float(), sparsify=sp, **kw)


@pytest.fixture(params=["kernels", "torch"], autouse=True)
def path(request, monkeypatch):
    """Run every test through the fused numba kernels and through the torch fallback."""
    from splice.methods import _kernels

    if request.param == "kernels" and not _kernels.AVAILABLE:
        pytest.skip("numba not installed")
    if request.param == "torch":
        monkeypatch.setattr(_kernels, "AVAILABLE", False)
    return request.param


N = SORT_LIMIT + 3 * TORCH_CHUNK + 123  # several chunks and a ragged last one


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize(
    "kw",
    [
        dict(weight=[1.0, 1.0, 1.0], trim_density=[0.2, 0.2, 0.2], consensus=True, normalize=True),
        dict(weight=[1.0, 0.5, -0.3], trim_density=[0.5, 0.1, 0.9], consensus=True, normalize=False, lambda_=0.7),
        dict(weight=[0.3, 0.3, 0.4], trim_density=[1.0, 0.0, 0.3], consensus=True, normalize=True),
        dict(weight=[1.0, 0.5, 0.25], consensus=False, normalize=True, lambda_=1.5),
        dict(weight=[1.0, 0.5, 0.25], consensus=False, normalize=False),
    ],
)
def test_chunked_is_bit_identical_to_whole_tensor_path(kw, quantized):
    ts, base = _models(N, quantized=quantized)
    fast = merge_task_vectors(ts, base, **dict(kw))  # bf16 inputs, chunked
    slow = _whole(ts, base, **dict(kw))
    assert fast.dtype == torch.float32
    assert torch.equal(fast, slow)


def test_trim_keeps_exactly_k_with_lowest_index_ties():
    ts, base = _models(N, k=1, quantized=True, dtype=torch.float32)
    d = ts[0] - base
    for density in (0.05, 0.3, 0.77):
        trim = _chunked.magnitude_trim(ts[0], base, density, torch.float32)
        tied = (d.abs() == trim.threshold).nonzero().squeeze(1)
        assert 0 < trim.cutoff < N and tied.numel() > 1  # quantized deltas tie at the threshold
        expected = magnitude_(d.clone(), density)
        assert int(torch.count_nonzero(expected)) == int(density * N)
        kept = torch.nn.functional.hardshrink(d, trim.threshold)
        first = tied[tied < trim.cutoff]
        assert 0 < first.numel() < tied.numel()  # some of the tied are kept, not all
        kept[first] = d[first]
        assert torch.equal(kept, expected)


def test_chunked_accepts_half_precision_without_rounding_the_arithmetic():
    ts, base = _models(N, dtype=torch.float16)
    out = merge_task_vectors(ts, base, weight=[1 / 3] * 3)
    ref = base.double() + sum((t.double() - base.double()) / 3 for t in ts)
    assert (out.double() - ref).abs().max() < 1e-6


# ----------------------------------------------------------------- DARE


def _drops(densities, rescale, seed=5):
    from splice.methods._sparsify import dare_keys

    return [_chunked.Drop(d, key, rescale) for d, key in zip(densities, dare_keys(torch.Generator().manual_seed(seed), len(densities)))]


def _whole_dare(tensors, base, drops, **kw):
    """The whole-tensor path with the same drop (a sparsify callback, float32 inputs)."""
    from splice.methods._sparsify import random_

    sp = lambda i, d, s: random_(d, drops[i].density, drops[i].rescale, key=drops[i].key, scratch=s)  # noqa: E731
    return merge_task_vectors([t.float() for t in tensors], base.float(), sparsify=sp, **kw)


@pytest.mark.parametrize(
    "densities,rescale,kw,quantized",  # quantized: bf16 deltas of few distinct values (tie-heavy)
    [
        ([0.3, 0.5, 0.9], True, dict(weight=[1.0, 0.5, -0.3], consensus=True, normalize=False), True),
        ([0.3, 1.0, 0.0], True, dict(weight=[1.0, 0.7, 0.4], consensus=True, normalize=True, lambda_=0.8), False),
        ([0.2, 0.6, 0.5], False, dict(weight=[0.3, 0.3, 0.4], consensus=True, normalize=True), True),
        ([0.5, 0.25, 0.75], True, dict(weight=[1.0, 0.5, 0.25], consensus=False, normalize=True, lambda_=1.5), False),
    ],
)
def test_dare_chunked_is_bit_identical_to_whole_tensor_path(densities, rescale, kw, quantized, monkeypatch):
    from splice.methods._sizes import SUM_BLOCK

    ts, base = _models(N, quantized=quantized)
    drops = _drops(densities, rescale)
    slow = _whole_dare(ts, base, drops, **dict(kw))
    assert torch.equal(merge_task_vectors(ts, base, drops=drops, **dict(kw)), slow)  # bf16 inputs, chunked
    monkeypatch.setattr(_chunked, "RESCALE_CHUNK", 3 * SUM_BLOCK)  # a rescale chunk that does not divide N
    assert torch.equal(merge_task_vectors(ts, base, drops=drops, **dict(kw)), slow)


def test_dare_ranks_do_not_depend_on_chunking_and_match_the_kernel():
    import numpy as np

    from splice.methods import _kernels
    from splice.methods._sparsify import DropKey, dare_ranks

    key = DropKey(0x9E3779B9, 0x12345678)
    whole = dare_ranks(key, 0, 10_000)
    cuts = [0, 1, 17, 4096, 4097, 9_999, 10_000]
    assert torch.equal(torch.cat([dare_ranks(key, a, b - a) for a, b in zip(cuts, cuts[1:])]), whole)
    assert abs(float(whole.double().mean()) / 2**24 - 0.5) < 0.01  # uniform on average
    if _kernels.AVAILABLE:
        for start in (0, 12_345, 2**32 - 3, 3 * 2**32 + 7):
            expected = dare_ranks(key, start, 5).tolist()
            got = [int(_kernels._dare_rank(np.int64(start + j), np.uint32(key.a), np.uint32(key.b))) for j in range(5)]
            assert got == expected


# ----------------------------------------------------------------- Breadcrumbs


@pytest.mark.parametrize(
    "densities,gammas,rescale,kw",
    [
        ([0.5, 0.8, 0.3], [0.05, 0.2, 0.0], True, dict(weight=[1.0, 0.5, -0.3], consensus=True, normalize=True)),
        ([0.9, 1.0, 0.0], [0.1, 0.3, 0.2], False, dict(weight=[1.0, 0.7, 0.4], consensus=False, normalize=False, lambda_=0.8)),
        ([0.2, 0.6, 0.95], [0.5, 0.01, 0.05], True, dict(weight=[0.3, 0.3, 0.4], consensus=False, normalize=True)),
    ],
)
def test_breadcrumbs_chunked_is_bit_identical_to_whole_tensor_path(densities, gammas, rescale, kw, path):
    from splice.methods._sparsify import breadcrumbs_

    ts, base = _models(N, quantized=True)  # tie-heavy: the window's bounds are straddled by ties
    if path == "kernels" and densities[0] + gammas[0] < 1 and gammas[0] > 0:  # both bounds: ties at each resolved by position
        w = _chunked.breadcrumbs_window(ts[0], base, densities[0], gammas[0])
        assert 0 < w.lo_cut < N and 0 < w.hi_cut < N
    fast = merge_task_vectors(ts, base, crumbs=list(zip(densities, gammas)), rescale=rescale, **dict(kw))
    sp = lambda i, d, s: breadcrumbs_(d, densities[i], gammas[i], rescale, scratch=s)  # noqa: E731
    assert torch.equal(fast, merge_task_vectors([t.float() for t in ts], base.float(), sparsify=sp, **dict(kw)))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_dare_mask_is_the_same_on_every_device(device):
    """On CUDA (no numba, no chunked path) DARE takes the whole-tensor torch path with the same integer hash: the same
    kept elements as the CPU's fused kernel; the values agree to rounding (a GPU sums the L1 norms in its own order)."""
    from splice.methods._sparsify import random_

    ts, base = _models(N)
    drops = _drops([0.3, 0.6, 0.5], True)
    kw = dict(weight=[1.0, 0.5, 0.8], consensus=True, normalize=False)
    cpu = merge_task_vectors(ts, base, drops=drops, **kw)
    on = merge_task_vectors([t.to(device) for t in ts], base.to(device), drops=drops, **kw).cpu()
    torch.testing.assert_close(on, cpu, rtol=1e-6, atol=1e-7)
    d = ts[0].float() - base.float()
    kept_here = random_(d.to(device), 0.3, False, key=drops[0].key) != 0
    assert torch.equal(kept_here.cpu(), random_(d.clone(), 0.3, False, key=drops[0].key) != 0)
