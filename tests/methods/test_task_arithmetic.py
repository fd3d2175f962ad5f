"""The task-arithmetic family (one function, eight methods): each against a float64
transcription of its paper's formula, plus properties and parity with mergekit.

task_arithmetic: base + lambda * sum_i w_i (t_i - base) [/ sum_i w_i]
ties: trim to the top-density magnitudes, elect signs, disjoint merge
dare_linear / dare_ties: DARE random drop + L1 rescale, then the weighted sum / TIES election
della / della_linear: MagPrune (rank-dependent random drop) + L1 rescale, then TIES election / the sum
breadcrumbs / breadcrumbs_ties: drop the largest outliers and the smallest entries, then the sum / TIES
"""

from __future__ import annotations

import pytest
import torch

from splice.methods import NO_DEFAULT, get_method
from splice.methods.task_arithmetic import FAMILY

NAMES = [v.name for v in FAMILY]


def resolve(name, n, **params):
    """Every parameter of ``name`` by recipe name: defaults filled in, per-model ones as lists of n."""
    m = get_method(name)
    out = {}
    for p in m.params:
        v = params.pop(p.name, p.default)
        assert v is not NO_DEFAULT, p.name
        out[p.name] = [v] * n if p.per_model and not isinstance(v, list) else v
    assert not params
    return out


def call(name, tensors, base, seed=0, **params):
    """The method's function itself (no registry checks), as the engine calls it after them."""
    m = get_method(name)
    kw = {get_method(name).param(k).py_name: v for k, v in resolve(name, len(tensors), **params).items()}
    if m.randomized:
        kw["generator"] = None if seed is None else torch.Generator().manual_seed(seed)
    return m.fn(list(tensors), base, **kw)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# ----------------------------------------------------------------- float64 transcriptions


def trim(d, density, rescale=False):
    """TIES trim: keep the max(1, int(density*n)) largest |d| (stable sort: ties to the lower index)."""
    if density >= 1:
        return d
    n = d.numel()
    k = 0 if density <= 0 else max(1, int(density * n))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.sort(d.abs(), descending=True, stable=True).indices[:k]] = True
    out = torch.where(keep, d, torch.zeros_like(d))
    if rescale and d.abs().sum() >= 1e-7 and out.abs().sum() >= 1e-7:
        out = out * (d.abs().sum() / out.abs().sum())
    return out


def dare_rank(j, key_a, key_b):
    """DARE's documented stream for flat element j: a 32-bit xorshift-multiply hash of (j, the model's key), top 24 bits."""

    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2**32
        x ^= x >> 15
        x = (x * 0x846CA68B) % 2**32
        return x ^ (x >> 16)

    return mix(mix((j % 2**32) ^ key_a) ^ (j >> 32) ^ key_b) >> 8


def dare_drop(d, p, key, rescale):
    """DARE: keep element j iff rank_j / 2**24 < density, L1 rescale."""
    u = torch.tensor([dare_rank(j, *key) / 2**24 for j in range(d.numel())], dtype=torch.float64)
    kept = torch.where(u < p, d, torch.zeros_like(d))
    if rescale and d.abs().sum() >= 1e-7 and kept.abs().sum() >= 1e-7:
        kept = kept * d.abs().sum() / kept.abs().sum()
    return kept


def magprune(d, density, eps, u, rescale=True):
    """DELLA MagPrune. Along dim 1 (1-D: one row): the element of ascending-magnitude rank j is
    kept iff u[..., j, ...] < p_j, p_j = density - eps + 2 eps j / (n - 1) (the documented use of
    one torch.rand per model)."""
    shaped = d.reshape(1, -1) if d.dim() < 2 else d
    n = shaped.shape[1]
    moved = shaped.movedim(1, -1)
    rows = moved.reshape(-1, n)
    u = u.reshape(shaped.shape).movedim(1, -1).reshape(-1, n)
    out = torch.zeros_like(rows)
    for r in range(rows.shape[0]):
        order = torch.sort(rows[r].abs(), stable=True).indices.tolist()
        for j, col in enumerate(order):
            p = density - eps + 2 * eps * j / (n - 1)
            if float(u[r, j]) < p:
                out[r, col] = rows[r, col]
    out = out.reshape(moved.shape).movedim(-1, 1).reshape(d.shape)
    if rescale and d.abs().sum() >= 1e-7 and out.abs().sum() >= 1e-7:
        out = out * (d.abs().sum() / out.abs().sum())
    return out


def crumbs(d, density, gamma, rescale=False):
    """Breadcrumbs: sort |d| ascending (stable); keep positions n_bot .. n_bot+int(density*n)."""
    if density >= 1:
        return d
    n = d.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.sort(d.abs(), stable=True).indices[n_bot : n_bot + target]] = True
    out = torch.where(keep, d, torch.zeros_like(d))
    if rescale and d.abs().sum() >= 1e-7 and out.abs().sum() >= 1e-7:
        out = out * (d.abs().sum() / out.abs().sum())
    return out


def elect(ds, weight, normalize, b, lam):
    """TIES sign election, element by element: the sign of the sum wins (0 counts as +), the
    agreeing non-zero weighted deltas are summed and, with normalize, divided by their weights
    (a zero divisor by 1)."""
    out = []
    for j in range(b.numel()):
        vals = [float(d[j]) for d in ds]
        positive = sum(vals) >= 0
        agree = [i for i, v in enumerate(vals) if v != 0 and (v > 0) == positive]
        s = sum(vals[i] for i in agree)
        if normalize:
            div = sum(weight[i] for i in agree)
            s /= div if div != 0 else 1.0
        out.append(float(b[j]) + lam * s)
    return torch.tensor(out, dtype=torch.float64)


def summed(ds, weight, normalize, b, lam):
    """The plain weighted sum of the (weighted) deltas, divided by sum(weight) with normalize."""
    total = torch.stack(ds).sum(0)
    if normalize and abs(sum(weight)) >= 1e-8:
        total /= sum(weight)
    return b + lam * total


def ref_task_arithmetic(tensors, base, p, seed):
    """Element by element, float64."""
    b = base.double()
    out = torch.empty_like(b)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in b.shape]).reshape(-1, b.dim()).tolist():
        idx = tuple(idx)
        s = sum(w * (float(t[idx]) - float(b[idx])) for w, t in zip(p["weight"], tensors))
        if p["normalize"] and abs(sum(p["weight"])) >= 1e-8:
            s /= sum(p["weight"])
        out[idx] = float(b[idx]) + p["lambda"] * s
    return out


def ref_ties(tensors, base, p, seed):
    b = base.double().reshape(-1)
    ds = [w * trim(t.double().reshape(-1) - b, dens, p["rescale"]) for t, w, dens in zip(tensors, p["weight"], p["density"])]
    return elect(ds, p["weight"], p["normalize"], b, p["lambda"]).reshape(base.shape)


def _dare_deltas(tensors, base, p, seed):
    """DARE transcribed, replaying the documented random stream: two 32-bit key integers per model drawn from the
    generator in model order (torch.randint(0, 2**32, (models, 2))), then a hash of (element index, key) per element."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, 2**32, (len(tensors), 2), generator=g).tolist()
    b = base.double().reshape(-1)
    ds = []
    for t, w, dens, key in zip(tensors, p["weight"], p["density"], keys):
        d = t.double().reshape(-1) - b
        if dens < 1:
            d = dare_drop(d, dens, key, p["rescale"])
        ds.append(w * d)
    return b, ds


def ref_dare_linear(tensors, base, p, seed):
    b, ds = _dare_deltas(tensors, base, p, seed)
    return summed(ds, p["weight"], p["normalize"], b, p["lambda"]).reshape(base.shape)


def ref_dare_ties(tensors, base, p, seed):
    b, ds = _dare_deltas(tensors, base, p, seed)
    return elect(ds, p["weight"], p["normalize"], b, p["lambda"]).reshape(base.shape)


def _della_deltas(tensors, base, p, seed):
    g = torch.Generator().manual_seed(seed)
    b = base.double()
    ds = []
    for t, w, dens, e in zip(tensors, p["weight"], p["density"], p["epsilon"]):
        d = t.double() - b
        if dens < 1:
            d = magprune(d, dens, e, torch.rand(base.shape, generator=g), p["rescale"])
        ds.append((w * d).reshape(-1))
    return b.reshape(-1), ds


def ref_della(tensors, base, p, seed):
    b, ds = _della_deltas(tensors, base, p, seed)
    return elect(ds, p["weight"], p["normalize"], b, p["lambda"]).reshape(base.shape)


def ref_della_linear(tensors, base, p, seed):
    b, ds = _della_deltas(tensors, base, p, seed)
    return summed(ds, p["weight"], p["normalize"], b, p["lambda"]).reshape(base.shape)


def _crumb_deltas(tensors, base, p):
    b = base.double().reshape(-1)
    zipped = zip(tensors, p["weight"], p["density"], p["gamma"])
    return b, [w * crumbs(t.double().reshape(-1) - b, dens, g, p["rescale"]) for t, w, dens, g in zipped]


def ref_breadcrumbs(tensors, base, p, seed):
    b, ds = _crumb_deltas(tensors, base, p)
    return summed(ds, p["weight"], p["normalize"], b, p["lambda"]).reshape(base.shape)


def ref_breadcrumbs_ties(tensors, base, p, seed):
    b, ds = _crumb_deltas(tensors, base, p)
    return elect(ds, p["weight"], p["normalize"], b, p["lambda"]).reshape(base.shape)


REFERENCE = {name: globals()[f"ref_{name}"] for name in NAMES}


def reference(name, tensors, base, seed=0, **params):
    return REFERENCE[name](tensors, base, resolve(name, len(tensors), **params), seed)


# ----------------------------------------------------------------- registration

GTA = {"weight": (NO_DEFAULT, True), "density": (1.0, True), "lambda": (1.0, False), "int8_mask": (False, False)}
SPEC = {  # name: (randomized, parameters beyond GTA's: name -> (default, per_model)), as mergekit 0.1.5 registers them
    "task_arithmetic": (False, {"normalize": (False, False), "rescale": (False, False)}),
    "ties": (False, {"normalize": (True, False), "rescale": (False, False)}),
    "dare_linear": (True, {"normalize": (False, False), "rescale": (True, False)}),
    "dare_ties": (True, {"normalize": (False, False), "rescale": (True, False)}),
    "della": (True, {"epsilon": (0.15, True), "normalize": (True, False), "rescale": (True, False)}),
    "della_linear": (True, {"epsilon": (0.15, True), "normalize": (False, False), "rescale": (True, False)}),
    "breadcrumbs": (False, {"gamma": (0.01, True), "normalize": (False, False), "rescale": (False, False)}),
    "breadcrumbs_ties": (False, {"gamma": (0.01, True), "normalize": (False, False), "rescale": (False, False)}),
}


def test_the_table_registers_the_eight_methods():
    assert sorted(NAMES) == sorted(SPEC)


@pytest.mark.parametrize("name", NAMES)
def test_registration_matches_mergekit(name):
    m = get_method(name)
    randomized, extra = SPEC[name]
    assert m.base == "required" and m.randomized == randomized
    assert {p.name: (p.default, p.per_model) for p in m.params} == {**GTA, **extra}
    # the chunked / fused path takes stored dtypes
    assert m.native_dtype


# ----------------------------------------------------------------- against the formula

FORMULA_CASES = [  # (method, shape, seeds of the fine-tunes' offsets, parameters, seed)
    ("task_arithmetic", (4, 4), (2, 3, 4), dict(weight=[0.5, -0.2, 0.9], normalize=False, **{"lambda": 0.8}), 0),
    ("task_arithmetic", (4, 4), (2, 3, 4), dict(weight=[0.5, -0.2, 0.9], normalize=True, **{"lambda": 0.8}), 0),
    ("ties", (4, 4), (2, 3, 4), dict(weight=[1.0, 0.6, 0.8], density=[0.5, 0.3, 0.7], normalize=True, rescale=False), 0),
    (
        "ties",
        (4, 4),
        (2, 3, 4),
        dict(weight=[1.0, -0.6, 0.8], density=[0.25, 1.0, 0.1], normalize=True, rescale=True, **{"lambda": 0.7}),
        0,
    ),
    (
        "ties",
        (4, 4),
        (2, 3, 4),
        dict(weight=[0.3, 0.3, 0.4], density=[0.6, 0.6, 0.6], normalize=False, rescale=False, **{"lambda": 1.5}),
        0,
    ),
    ("dare_linear", (4, 4), (2, 3), dict(weight=[0.7, 0.4], density=[0.5, 0.8], normalize=False, rescale=True), 7),
    ("dare_linear", (4, 4), (2, 3), dict(weight=[0.7, 0.4], density=[0.5, 0.8], normalize=True, rescale=False), 7),
    *[
        (
            "dare_ties",
            (4, 4),
            (2, 3, 4),
            dict(weight=[0.7, 0.4, 1.1], density=[0.5, 0.8, 0.6], normalize=n, rescale=r, **{"lambda": 0.9}),
            11,
        )
        for n, r in [(False, True), (True, True), (True, False)]
    ],
    *[
        ("della", shape, (2, 3, 4), dict(weight=[0.8, 0.5, 1.0], density=[0.5, 0.4, 0.7], epsilon=[0.2, 0.1, 0.15], **{"lambda": 1.2}), 5)
        for shape in [(4, 4), (3, 5), (7,)]
    ],
    *[
        ("della_linear", shape, (2, 3), dict(weight=[0.8, 0.5], density=[0.5, 0.3], epsilon=[0.2, 0.1], normalize=n, rescale=r), 9)
        for shape, n, r in [((4, 4), False, True), ((3, 5), True, False), ((7,), False, True)]
    ],
    *[
        ("breadcrumbs", (4, 4), (2, 3), dict(weight=[0.8, 0.5], density=d, gamma=g, normalize=n, rescale=r, **{"lambda": 1.1}), 0)
        for d, g, n, r in [
            ([0.5, 0.75], [0.125, 0.0625], False, False),
            ([0.9, 0.3], [0.3, 0.01], True, True),
            ([1.0, 0.0], [0.2, 0.2], False, True),
        ]
    ],
    *[
        (
            "breadcrumbs_ties",
            (4, 4),
            (2, 3, 4),
            dict(weight=[0.8, -0.5, 1.0], density=d, gamma=g, normalize=n, rescale=r, **{"lambda": 0.9}),
            0,
        )
        for d, g, n, r in [([0.5, 0.75, 0.5], [0.125, 0.0625, 0.0], False, False), ([0.9, 0.3, 0.6], [0.3, 0.01, 0.2], True, True)]
    ],
]


@pytest.mark.parametrize("name,shape,seeds,params,seed", FORMULA_CASES)
def test_against_formula(name, shape, seeds, params, seed):
    base = rand(*shape, seed=1)
    ts = [base + rand(*shape, seed=s) for s in seeds]
    close(call(name, ts, base, seed=seed, **params), reference(name, ts, base, seed=seed, **params))


# ----------------------------------------------------------------- task_arithmetic


def test_task_arithmetic_properties():
    base = rand(5, 3, seed=5)
    delta = rand(5, 3, seed=6)
    # identical fine-tunes, normalized: base + delta
    out = call("task_arithmetic", [base + delta] * 3, base, weight=[0.2, 0.3, 0.5], normalize=True)
    torch.testing.assert_close(out, base + delta)
    # zero deltas: base
    assert torch.equal(call("task_arithmetic", [base.clone(), base.clone()], base, weight=[0.7, 0.4]), base)
    # weights summing to ~0 cannot be normalized: an error, not the unnormalized sum (mergekit's result)
    with pytest.raises(ValueError, match=r"normalize divides by the sum of the weights \[1.0, -1.0\], which is 0"):
        call("task_arithmetic", [base + delta, base + delta], base, weight=[1.0, -1.0], normalize=True)
    # no models: base
    assert torch.equal(call("task_arithmetic", [], base, weight=[]), base)


def test_task_arithmetic_1d_and_finite():
    base = rand(7, seed=7)
    ts = [base + rand(7, seed=8), base + rand(7, seed=9)]
    out = call("task_arithmetic", ts, base, weight=[1.0, 0.5])
    close(out, reference("task_arithmetic", ts, base, weight=[1.0, 0.5]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_inputs_untouched(name):
    base = rand(3, 3, seed=10)
    ts = [base + rand(3, 3, seed=11)]
    copies = [base.clone(), ts[0].clone()]
    call(name, ts, base, weight=[1.0], density=0.5)
    assert torch.equal(base, copies[0]) and torch.equal(ts[0], copies[1])


# ----------------------------------------------------------------- ties


def test_ties_density_one_is_sign_consensus_task_arithmetic_by_hand():
    base = torch.zeros(2)
    ts = [torch.tensor([1.0, -2.0]), torch.tensor([-3.0, 1.0]), torch.tensor([1.0, 1.0])]
    # column 0: sum -1 -> negative wins -> only -3 (weight 1) -> -3
    # column 1: sum 0 counts as positive -> 1 and 1 -> 2 / 2 = 1
    out = call("ties", ts, base, weight=[1.0, 1.0, 1.0], density=1.0)
    assert out.tolist() == [-3.0, 1.0]
    out = call("ties", ts, base, weight=[1.0, 1.0, 1.0], density=1.0, normalize=False)
    assert out.tolist() == [-3.0, 2.0]


def test_ties_properties():
    base = rand(6, 5, seed=5)
    delta = rand(6, 5, seed=6)
    # identical fine-tunes: base + the trimmed delta, whatever the (positive) weights
    out = call("ties", [base + delta] * 3, base, weight=[0.2, 0.5, 2.0], density=0.4)
    close(out, base.double() + trim(delta.double().reshape(-1), 0.4).reshape(6, 5))
    # zero deltas and density 0: base
    assert torch.equal(call("ties", [base.clone(), base.clone()], base, weight=[1.0, 1.0], density=0.5), base)
    assert torch.equal(call("ties", [base + delta], base, weight=[1.0], density=0.0), base)
    assert torch.equal(call("ties", [], base, weight=[]), base)


def test_ties_small_tensor_ties_resolve_like_mergekits_sort():
    base = torch.zeros(64)
    t = (torch.randint(-3, 4, (64,), generator=torch.Generator().manual_seed(0)) * 0.5).float()
    keep = torch.zeros(64, dtype=torch.bool)
    keep[torch.argsort(t.abs(), descending=True)[:25]] = True  # mergekit's trim, ties included
    out = call("ties", [t], base, weight=[1.0], density=25 / 64)
    assert torch.equal(out, torch.where(keep, t, torch.zeros_like(t)))


def magnitude_mask(t, base, density):
    from splice.methods._sparsify import magnitude_

    return magnitude_((t - base).reshape(-1), density) != 0


def test_ties_1d_and_large_are_exact():
    base = rand(37, seed=7)
    ts = [base + rand(37, seed=8), base + rand(37, seed=9)]
    close(call("ties", ts, base, weight=[1.0, 0.5], density=[0.3, 0.6]), reference("ties", ts, base, weight=[1.0, 0.5], density=[0.3, 0.6]))
    base = rand(200, 100, seed=10)
    ts = [base + 0.01 * rand(200, 100, seed=11 + i) for i in range(2)]
    out = call("ties", ts, base, weight=[1.0, 1.0], density=0.2)
    b = base.double().reshape(-1)
    kept = [trim(t.double().reshape(-1) - b, 0.2) != 0 for t in ts]
    mine = [magnitude_mask(t, base, 0.2) for t in ts]
    for a, e in zip(mine, kept):
        assert torch.equal(a, e)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------- density 1: no sparsification


DENSITY_ONE = [  # (method, equal to, shape, base seed, fine-tunes as (sign, seed) offsets, weights, parameters)
    ("dare_ties", "ties", (6, 7), 2, [(1, 3), (1, 4), (-1, 5)], [0.4, 0.3, 0.9], {"normalize": False}),
    ("dare_ties", "ties", (6, 7), 2, [(1, 3), (1, 4), (-1, 5)], [0.4, 0.3, 0.9], {"normalize": True}),
    ("della", "ties", (6, 7), 2, [(1, 3), (-1, 4)], [0.4, 0.9], {}),
    ("breadcrumbs_ties", "ties", (5, 4), 5, [(1, 6), (-1, 7), (1, 8)], [1.0, 0.5, 0.7], {"normalize": True}),
]


@pytest.mark.parametrize("name,same_as,shape,base_seed,offsets,weight,params", DENSITY_ONE)
def test_density_one_equals_ties(name, same_as, shape, base_seed, offsets, weight, params):
    """dare_ties, della and breadcrumbs_ties drop nothing at density 1: TIES, bit for bit."""
    base = rand(*shape, seed=base_seed)
    ts = [base + sign * rand(*shape, seed=s) for sign, s in offsets]
    out = call(name, ts, base, weight=weight, density=1.0, **params)
    assert torch.equal(out, call(same_as, ts, base, weight=weight, density=1.0, **params))


def test_della_linear_density_one_is_task_arithmetic():
    base = rand(6, 7, seed=2)
    ts = [base + rand(6, 7, seed=3), base - rand(6, 7, seed=4)]
    out = call("della_linear", ts, base, weight=[0.4, 0.9], density=1.0)
    assert torch.equal(out, call("task_arithmetic", ts, base, weight=[0.4, 0.9]))


def test_dare_linear_density_one_is_task_arithmetic_and_edges():
    base = rand(9, seed=8)  # 1-D
    delta = rand(9, seed=9)
    ta = get_method("task_arithmetic").fn
    # density 1: plain task arithmetic, no randomness
    out = call("dare_linear", [base + delta, base - delta / 2], base, weight=[0.3, 0.9], density=1.0)
    torch.testing.assert_close(
        out,
        ta(
            [base + delta, base - delta / 2],
            base,
            weight=[0.3, 0.9],
            density=[1.0, 1.0],
            normalize=False,
            rescale=False,
            lambda_=1.0,
            int8_mask=False,
        ),
    )
    assert torch.equal(call("dare_linear", [base + delta], base, weight=[1.0], density=0.0), base)
    assert torch.equal(call("dare_linear", [base.clone(), base.clone()], base, weight=[1.0, 1.0], density=0.5), base)
    assert torch.equal(call("dare_linear", [], base, weight=[]), base)


# ----------------------------------------------------------------- DARE and DELLA: rates, rescale, seeds


def test_dare_linear_keeps_density_fraction_and_preserves_l1():
    base = rand(200, 200, seed=3)
    delta = rand(200, 200, seed=4)
    out = call("dare_linear", [base + delta], base, seed=1, weight=[1.0], density=0.3)
    changed = out != base
    assert abs(float(changed.float().mean()) - 0.3) < 0.01
    moved = (out - base).double()
    assert abs(float(moved.abs().sum() / delta.double().abs().sum()) - 1) < 1e-4  # L1 rescale
    assert abs(float(moved.mean() - delta.double().mean())) < 0.02  # unbiased on average
    # kept entries are scaled by about 1/density
    ratio = moved[changed] / delta.double()[changed]
    assert abs(float(ratio.mean()) * 0.3 - 1) < 0.05


def test_dare_ties_keeps_density_fraction_and_rescales():
    base = rand(200, 200, seed=6)
    delta = rand(200, 200, seed=7)
    out = call("dare_ties", [base + delta], base, seed=2, weight=[1.0], density=0.25)  # one model: every kept entry agrees
    changed = out != base
    assert abs(float(changed.float().mean()) - 0.25) < 0.01
    moved = (out - base).double()
    assert abs(float(moved.abs().sum() / delta.double().abs().sum()) - 1) < 1e-4
    assert abs(float((moved[changed] / delta.double()[changed]).mean()) * 0.25 - 1) < 0.05  # ~1/density


def test_della_keep_rate_and_rescale():
    base = rand(400, 50, seed=5)
    delta = rand(400, 50, seed=6)
    out = call("della", [base + delta], base, seed=3, weight=[1.0], density=0.4, epsilon=0.2)
    moved = (out - base).double()
    assert abs(float((moved != 0).double().mean()) - 0.4) < 0.01
    assert abs(float(moved.abs().sum() / delta.double().abs().sum()) - 1) < 1e-4
    # the largest-magnitude fifth of each row is kept far more often than the smallest fifth
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    top = float((moved[ranks >= 40] != 0).double().mean())
    bottom = float((moved[ranks < 10] != 0).double().mean())
    assert abs(top - 0.56) < 0.03 and abs(bottom - 0.24) < 0.03


def test_dare_linear_seeded():
    base = rand(30, 30, seed=5)
    ts = [base + rand(30, 30, seed=6), base + rand(30, 30, seed=7)]
    kw = dict(weight=[0.5, 0.5], density=0.5)
    a, b, c = (
        call("dare_linear", ts, base, seed=3, **kw),
        call("dare_linear", ts, base, seed=3, **kw),
        call("dare_linear", ts, base, seed=4, **kw),
    )
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.isfinite(call("dare_linear", ts, base, seed=None, **kw)).all()  # no generator: torch's global RNG


def test_dare_ties_seeded_and_edges():
    base = rand(40, 3, seed=8)
    ts = [base + rand(40, 3, seed=9), base + rand(40, 3, seed=10)]
    kw = dict(weight=[1.0, 1.0], density=0.5)
    a, b, c = (
        call("dare_ties", ts, base, seed=1, **kw),
        call("dare_ties", ts, base, seed=1, **kw),
        call("dare_ties", ts, base, seed=2, **kw),
    )
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()
    v = rand(11, seed=11)  # 1-D
    out = call("dare_ties", [v + 1, v - 1], v, seed=0, weight=[1.0, 1.0], density=0.5)
    assert out.shape == v.shape and torch.isfinite(out).all()
    assert torch.equal(call("dare_ties", [base + 1], base, weight=[1.0], density=0.0), base)
    assert torch.equal(call("dare_ties", [base.clone(), base.clone()], base, **kw), base)


def test_della_seeded_and_edges():
    base = rand(20, 6, seed=7)
    ts = [base + rand(20, 6, seed=8), base + rand(20, 6, seed=9)]
    kw = dict(weight=[1.0, 1.0], density=0.5)
    a, b, c = call("della", ts, base, seed=1, **kw), call("della", ts, base, seed=1, **kw), call("della", ts, base, seed=2, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()
    with pytest.raises(ValueError, match=r"epsilon must keep density \+- epsilon inside \(0, 1\) \(density=0.9, epsilon=0.15\)"):
        call("della", ts, base, weight=[1.0, 1.0], density=0.9, epsilon=0.15)
    assert torch.equal(call("della", [base + 1], base, weight=[1.0], density=0.0), base)
    assert torch.equal(call("della", [base.clone()] * 2, base, **kw), base)
    col = rand(9, 1, seed=10)  # rows of a single element
    assert torch.isfinite(call("della", [col + 1], col, weight=[1.0], density=0.5)).all()
    cube = rand(2, 6, 3, seed=11)  # 3-D: ranks along dim 1, as mergekit's argsort(dim=1)
    out = call("della", [cube + rand(2, 6, 3, seed=12)], cube, seed=4, weight=[1.0], density=0.5, epsilon=0.2)
    torch.testing.assert_close(
        out.double(), reference("della", [cube + rand(2, 6, 3, seed=12)], cube, seed=4, weight=[1.0], density=0.5, epsilon=0.2)
    )


def test_della_linear_keep_rate_seeded_and_edges():
    base = rand(300, 40, seed=5)
    delta = rand(300, 40, seed=6)
    out = call("della_linear", [base + delta], base, seed=3, weight=[1.0], density=0.3, epsilon=0.1)
    moved = (out - base).double()
    assert abs(float((moved != 0).double().mean()) - 0.3) < 0.01
    assert abs(float(moved.abs().sum() / delta.double().abs().sum()) - 1) < 1e-4
    again = call("della_linear", [base + delta], base, seed=3, weight=[1.0], density=0.3, epsilon=0.1)
    other = call("della_linear", [base + delta], base, seed=4, weight=[1.0], density=0.3, epsilon=0.1)
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert torch.equal(call("della_linear", [base + delta], base, weight=[1.0], density=0.0), base)
    assert torch.equal(call("della_linear", [base.clone()] * 2, base, weight=[1.0, 1.0], density=0.5), base)
    with pytest.raises(ValueError, match=r"epsilon must keep density \+- epsilon inside \(0, 1\) \(density=0.1, epsilon=0.1\)"):
        call("della_linear", [base + delta], base, weight=[1.0], density=0.1, epsilon=0.1)


# ----------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_drops_outliers_and_small():
    base = torch.zeros(10)
    t = torch.arange(1.0, 11.0) * torch.tensor([1, -1] * 5)  # |t| = 1..10
    out = call("breadcrumbs", [t], base, weight=[1.0], density=0.6, gamma=0.2)  # drop 2 largest and 2 smallest
    assert out.abs().tolist() == [0, 0, 3, 4, 5, 6, 7, 8, 0, 0]
    assert torch.equal(out[2:8], t[2:8])


def test_breadcrumbs_properties():
    base = rand(8, 5, seed=4)
    delta = rand(8, 5, seed=5)
    out = call("breadcrumbs", [base + delta] * 3, base, weight=[0.5, 0.25, 0.25], density=0.5, gamma=0.1)  # weights sum to 1
    torch.testing.assert_close(out.double(), base.double() + crumbs(delta.double().reshape(-1), 0.5, 0.1).reshape(8, 5))
    assert torch.equal(call("breadcrumbs", [base.clone()] * 2, base, weight=[1.0, 1.0], density=0.5), base)
    assert torch.equal(call("breadcrumbs", [base + delta], base, weight=[1.0], density=0.0), base)
    # density 1: nothing dropped, gamma ignored (as in mergekit)
    torch.testing.assert_close(call("breadcrumbs", [base + delta], base, weight=[1.0], density=1.0, gamma=0.3), base + delta)
    v = rand(13, seed=6)  # 1-D
    out = call("breadcrumbs", [v + rand(13, seed=7)], v, weight=[1.0], density=0.5, gamma=0.1)
    torch.testing.assert_close(out.double(), reference("breadcrumbs", [v + rand(13, seed=7)], v, weight=[1.0], density=[0.5], gamma=[0.1]))


def test_breadcrumbs_ties_properties():
    base = rand(8, 5, seed=9)
    delta = rand(8, 5, seed=10)
    out = call("breadcrumbs_ties", [base + delta] * 2, base, weight=[1.0, 1.0], density=0.5, gamma=0.1, normalize=True)
    torch.testing.assert_close(out.double(), base.double() + crumbs(delta.double().reshape(-1), 0.5, 0.1).reshape(8, 5))
    assert torch.equal(call("breadcrumbs_ties", [base.clone()] * 2, base, weight=[1.0, 1.0], density=0.5), base)
    assert torch.equal(call("breadcrumbs_ties", [base + delta], base, weight=[1.0], density=0.0), base)
    v = rand(13, seed=11)
    ts = [v + rand(13, seed=12), v - rand(13, seed=13)]
    out = call("breadcrumbs_ties", ts, v, weight=[1.0, 1.0], density=0.6, gamma=0.1)
    torch.testing.assert_close(out.double(), reference("breadcrumbs_ties", ts, v, weight=[1.0, 1.0], density=[0.6] * 2, gamma=[0.1] * 2))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------- divisions by a sum of weights


@pytest.mark.parametrize("name", ["task_arithmetic", "dare_linear", "breadcrumbs", "della_linear"])
def test_plain_sum_refuses_weights_that_sum_to_zero(name):
    base = rand(6, 6, seed=20)
    ts = [base + rand(6, 6, seed=21), base + rand(6, 6, seed=22)]
    with pytest.raises(ValueError, match=r"normalize divides by the sum of the weights \[1.0, -1.0\], which is 0"):
        call(name, ts, base, weight=[1.0, -1.0], density=0.5, normalize=True)
    call(name, ts, base, weight=[1.0, -1.0], density=0.5, normalize=False)  # no division: fine


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_consensus_refuses_agreeing_weights_that_cancel(name):
    base = torch.zeros(4)
    # weighted deltas (1 * d0, -1 * d1) agree in sign everywhere, and the weights 1 and -1 cancel
    ts = [torch.tensor([0.5, 0.2, -0.3, 0.4]), torch.tensor([-0.3, -0.1, 0.2, -0.2])]
    with pytest.raises(ValueError, match=r"the weights \[1.0, -1.0\] cancel to 0 at 4 element\(s\)"):
        call(name, ts, base, weight=[1.0, -1.0], density=1.0, normalize=True)
    out = call(name, ts, base, weight=[1.0, -1.0], density=1.0, normalize=False)  # no division: the agreeing sum
    close(out, ts[0] - ts[1])


def test_consensus_keeps_the_base_where_no_model_takes_part():
    """A zero divisor where nothing agrees is mergekit's (meaningful) base, negative weights or not."""
    base = rand(4, seed=23)
    ts = [base.clone(), base + torch.tensor([0.0, 0.5, 0.0, -0.5])]
    out = call("ties", ts, base, weight=[-1.0, 2.0], density=1.0, normalize=True)
    close(out, base + torch.tensor([0.0, 0.5, 0.0, -0.5]))


@pytest.mark.parametrize("numba", [True, False])
def test_cancelled_weights_are_refused_on_the_chunked_paths(numba, monkeypatch):
    from splice.methods import _kernels
    from splice.methods._sparsify import SORT_LIMIT

    if numba and not _kernels.AVAILABLE:
        pytest.skip("numba not installed")
    monkeypatch.setattr(_kernels, "AVAILABLE", numba and _kernels.AVAILABLE)
    n = SORT_LIMIT + 5
    base = torch.zeros(n)
    ts = [torch.full((n,), 0.5), torch.full((n,), -0.25)]
    ts[1][:7] = 0.25  # 7 elements where the models disagree: only the first takes part, divisor 1
    with pytest.raises(ValueError, match=rf"the weights \[1.0, -1.0\] cancel to 0 at {n - 7} element\(s\)"):
        call("ties", ts, base, weight=[1.0, -1.0], density=1.0)
    with pytest.raises(ValueError, match=r"the sum of the weights \[0.5, -0.5\], which is 0"):
        call("task_arithmetic", ts, base, weight=[0.5, -0.5], normalize=True)


# ----------------------------------------------------------------- the registry's checks


def test_the_method_checks_inputs_and_parameter_ranges():
    ties = get_method("ties")
    base = rand(3, 3, seed=30)
    ts = [base + rand(3, 3, seed=31), base + rand(3, 3, seed=32)]
    with pytest.raises(ValueError, match="needs a base model"):
        ties(ts, None, weight=1.0)
    with pytest.raises(ValueError, match=r"tensors have different shapes \[\(3,\), \(3, 3\)\]"):
        ties([ts[0], torch.zeros(3)], base, weight=1.0)
    with pytest.raises(ValueError, match="parameter 'density' has 3 values for 2 models"):
        ties(ts, base, weight=1.0, density=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"parameter 'density' must be a number in \[0, 1\], got 1.5"):
        ties(ts, base, weight=1.0, density=[0.5, 1.5])
    with pytest.raises(ValueError, match="parameter 'lambda' must be a finite number, got nan"):
        ties(ts, base, weight=1.0, lambda_=float("nan"))
    with pytest.raises(ValueError, match="parameter 'normalize' must be true or false, got 'yes'"):
        ties(ts, base, weight=1.0, normalize="yes")
    with pytest.raises(ValueError, match="needs parameter 'weight'"):
        ties(ts, base)
    with pytest.raises(ValueError, match=r"parameter 'gamma' must be a number in \[0, 1\], got -0.1"):
        get_method("breadcrumbs")(ts, base, weight=1.0, gamma=-0.1)
    with pytest.raises(ValueError, match=r"parameter 'epsilon' must be a number in \[0, 1\), got 1"):
        get_method("della")(ts, base, weight=1.0, epsilon=1, generator=torch.Generator().manual_seed(0))
    # scalars for per-model parameters apply to every model; the result is the function's
    assert torch.equal(ties(ts, base, weight=1.0, density=0.5), call("ties", ts, base, weight=[1.0, 1.0], density=[0.5, 0.5]))


# ----------------------------------------------------------------- parity with mergekit

PARITY = {  # name: (shape, also bf16-valued models, rtol, parameter sets)
    "task_arithmetic": (
        (16, 12),
        False,
        1e-6,
        [{"weight": [0.5, 0.3, 0.7]}, {"weight": [1.0, -0.4, 0.2], "normalize": True, "lambda": 1.3}],
    ),
    "ties": (
        (33, 17),
        True,
        1e-5,
        [
            {"weight": [1.0, 0.6, 0.8], "density": [0.5, 0.3, 0.7]},
            {"weight": [1.0, -0.6, 0.8], "density": [0.5, 0.3, 0.7], "rescale": True, "lambda": 0.7},
            {"weight": [0.2, 0.6, 0.8], "density": [1.0, 0.05, 0.9], "normalize": False},
        ],
    ),
    # random methods: the deterministic path (density 1: no drop)
    "dare_linear": ((16, 12), False, 1e-6, [{"weight": [0.5, 0.3, 0.7], "normalize": True, "lambda": 0.9}]),
    "dare_ties": ((16, 12), False, 1e-6, [{"weight": [0.5, -0.3, 0.7]}, {"weight": [0.5, 0.3, 0.7], "normalize": True, "lambda": 1.2}]),
    "della": ((16, 12), False, 1e-6, [{"weight": [0.5, -0.3, 0.7]}, {"weight": [0.5, 0.3, 0.7], "normalize": False, "lambda": 1.2}]),
    "della_linear": ((16, 12), False, 1e-6, [{"weight": [0.5, -0.3, 0.7]}, {"weight": [0.5, 0.3, 0.7], "normalize": True, "lambda": 1.2}]),
    "breadcrumbs": (
        (33, 17),
        True,
        1e-5,
        [
            {"weight": [1.0, 0.5, 0.7], "density": [0.8] * 3, "gamma": [0.05] * 3},
            {"weight": [1.0, 0.5, 0.7], "density": [0.8, 0.3, 0.9], "gamma": [0.05, 0.2, 0.5], "rescale": True, "normalize": True},
        ],
    ),
    "breadcrumbs_ties": (
        (33, 17),
        True,
        1e-5,
        [
            {"weight": [1.0, 0.5, 0.7], "density": [0.8] * 3, "gamma": [0.05] * 3},
            {"weight": [1.0, -0.5, 0.7], "density": [0.8, 0.3, 0.9], "gamma": [0.05, 0.2, 0.5], "rescale": True, "normalize": True},
        ],
    ),
}


@pytest.mark.mergekit
@pytest.mark.parametrize("name", NAMES)
def test_parity_with_mergekit(mergekit, name):

    shape, quantized, rtol, param_sets = PARITY[name]
    base = rand(*shape, seed=12)
    ts = [base + 0.1 * rand(*shape, seed=13 + i) for i in range(3)]
    # bf16-valued models: deltas take few distinct values, so magnitudes tie at the threshold
    cases = [(ts, base)] + ([([t.bfloat16().float() for t in ts], base.bfloat16().float())] if quantized else [])
    for ts, base in cases:
        for params in param_sets:
            expected = mergekit.merge("mergekit.merge_methods.registry:get", [base, *ts], base_index=0, parameters=params, registry=name)
            torch.testing.assert_close(call(name, ts, base, **dict(params)), expected, rtol=rtol, atol=1e-6)
