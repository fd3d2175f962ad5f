"""Same recipe and seed, same bytes, whatever the thread and worker counts: every method, end to end.

torch splits a whole-tensor reduction (an L1 norm, a dot product, a sum) across its
threads once the tensor has more elements than its grain (32768) and adds the parts
in a thread-count-dependent order; the models here have 65536-element embeddings and
output heads so that every method meets such tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from helpers import make_model, random_statistics

import splice
from splice.methods import _reduce, all_methods

HIDDEN, VOCAB = 64, 1024  # embeddings of 65536 elements: above torch's reduction grain


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    base = make_model(root / "base", "llama", seed=0, layers=2, hidden=HIDDEN, vocab=VOCAB, tokenizer=False)
    fts = [
        make_model(root / f"ft{i}", "llama", seed=40 + i, layers=2, hidden=HIDDEN, vocab=VOCAB, from_model=base, tokenizer=False)
        for i in range(3)
    ]
    return base, fts


def recipe(method, base, fts) -> dict:
    """A recipe exercising the method's sparsification and reductions, with as many models as it takes."""
    m = method
    n = m.max_models if m.max_models is not None else 3
    per_model = {"weight": [1.0, 0.6, 0.8][:n]} if m.param("weight") else {}
    if m.param("density"):
        per_model["density"] = 0.5
    models = [
        {"model": str(ft), "parameters": {k: (v[i] if isinstance(v, list) else v) for k, v in per_model.items()}}
        for i, ft in enumerate(fts[:n])
    ]
    data = {"merge_method": m.name, "models": models}
    if m.base != "none":
        data["base_model"] = str(base)
    if m.param("t"):
        data["parameters"] = {"t": 0.3 if m.name == "slerp" else 0.001}
    if m.name == "passthrough":
        models[0]["parameters"] = {"scale": 0.5}
    if m.statistics:  # data-aware methods: random statistics of each model
        stats = {ft: ft.parent / f"{ft.name}.stats.safetensors" for ft in fts[:n]}
        data["calibration"] = {
            str(ft): str(p if p.exists() else random_statistics(ft, p, seed=i)) for i, (ft, p) in enumerate(stats.items())
        }
    return data


@pytest.mark.parametrize("name", [m.name for m in all_methods()])
def test_bytes_do_not_depend_on_threads_or_workers(tmp_path, models, name):
    base, fts = models
    method = next(m for m in all_methods() if m.name == name)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(method, base, fts)))
    one = splice.merge(path, tmp_path / "one", quiet=True, seed=5, workers=1, threads=1)
    two = splice.merge(path, tmp_path / "two", quiet=True, seed=5, workers=2, threads=2)
    assert one["tensors"] == two["tensors"] > 0
    files = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / "two").glob("*.safetensors"))
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f"{name}: {f} differs"


@pytest.mark.parametrize("n", [0, 1, 5, 16384, 16385, 65536 + 7, 300_001])
def test_reductions_are_thread_independent_and_right(n):
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, generator=g), torch.randn(n, generator=g)
    results = []
    for threads in (1, 2, 3):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append([_reduce.norm(x, 1), _reduce.norm(x, 2), _reduce.total(x), _reduce.dot(x, y)])
        finally:
            torch.set_num_threads(before)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, results[0]))
    l1, l2, total, dot = (float(v) for v in results[0])
    xd, yd = x.double(), y.double()
    # float32 partial sums: a few float32 ulps of the float64 truth
    assert math.isclose(l1, float(xd.abs().sum()), rel_tol=2e-5, abs_tol=1e-6)
    assert math.isclose(l2, float(xd.norm()), rel_tol=2e-5, abs_tol=1e-6)
    assert math.isclose(total, float(xd.sum()), abs_tol=2e-5 * float(xd.abs().sum()) + 1e-6)
    assert math.isclose(dot, float(xd @ yd), abs_tol=2e-5 * float((xd * yd).abs().sum()) + 1e-6)
    assert results[0][0].dtype == torch.float32 and results[0][0].dim() == 0


def test_last_axis_reductions_match_torch():
    x = torch.randn(3, 70_000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_reduce.norm_last(x, keepdim=True), torch.linalg.vector_norm(x, dim=-1, keepdim=True))
    assert torch.equal(_reduce.sum_last(x), x.sum(dim=-1))
    row = x[:1]  # a single row: the whole-tensor path, shaped like torch's
    assert _reduce.norm_last(row, keepdim=True).shape == (1, 1) and _reduce.sum_last(row).shape == (1,)
    torch.testing.assert_close(_reduce.sum_last(row), row.double().sum(dim=-1).float(), rtol=2e-5, atol=1e-3)
