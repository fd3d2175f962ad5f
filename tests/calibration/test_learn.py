"""Learned merge weights (``learn:``): the differentiable family merge, the recipe checks, and the tuned merge end to end."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import load_sd, word_docs

from splice.calibration.learn import family_value, sparsified_deltas
from splice.errors import RecipeError
from splice.methods.task_arithmetic import FAMILY, merge_family
from splice.recipe import parse_recipe

VARIANTS = {v.name: v for v in FAMILY}


def _inputs(shape, k=3, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    fts = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(k)]
    if ties:  # few distinct delta magnitudes: exact ties in every selection
        fts = [base + 0.05 * torch.randint(-2, 3, shape, generator=g).float() for _ in range(k)]
    return fts, base


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("shape", [(8, 12), (600, 520)])  # whole-tensor and chunked paths
def test_the_differentiable_merge_is_the_methods_merge(name, shape):
    v = VARIANTS[name]
    fts, base = _inputs(shape, ties=shape == (8, 12))
    w = [0.7, 0.4, 1.1]
    kw = {"density": [0.5, 0.6, 0.4], "rescale": v.rescale}
    if v.sparsification == "magnitude_outliers":
        kw["gamma"] = [0.01] * 3
    if v.sparsification == "della_magprune":
        kw["epsilon"] = [0.1] * 3
    seeded = (lambda: torch.Generator().manual_seed(1234)) if v.sparsification in ("random", "della_magprune") else None
    want = merge_family(
        fts,
        base,
        sparsification=v.sparsification,
        consensus=v.consensus,
        weight=w,
        normalize=v.normalize,
        lambda_=0.8,
        generator=seeded() if seeded else None,
        **kw,
    )
    deltas = sparsified_deltas(fts, base, sparsification=v.sparsification, generator=seeded, **kw)
    got = family_value(deltas, base, torch.tensor(w), consensus=v.consensus, normalize=v.normalize, lambda_=0.8)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("consensus,normalize", [(False, False), (False, True), (True, False), (True, True)])
def test_the_gradient_in_the_weights_is_the_finite_difference(consensus, normalize):
    """Away from a change of elected sign, the merge is smooth in the weights: autograd matches central differences."""
    fts, base = _inputs((6, 7), seed=3)
    deltas = torch.stack([(t - base).double() for t in fts])
    base = base.double()
    w = torch.tensor([0.6, 0.9, 0.3], dtype=torch.float64, requires_grad=True)
    probe = torch.randn(base.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def f(x):
        return (family_value(deltas, base, x, consensus=consensus, normalize=normalize, lambda_=1.5) * probe).sum()

    f(w).backward()
    eps = 1e-6
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = eps
        fd = (f(w.detach() + e) - f(w.detach() - e)) / (2 * eps)
        assert abs(float(w.grad[i]) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


def test_elected_signs_follow_the_weights():
    """Two models disagreeing on one element: the heavier one's sign is elected and it alone is averaged."""
    base = torch.zeros(1)
    deltas = torch.tensor([[1.0], [-3.0]])
    a = family_value(deltas, base, torch.tensor([1.0, 0.2]), consensus=True, normalize=True, lambda_=1.0)
    b = family_value(deltas, base, torch.tensor([1.0, 0.5]), consensus=True, normalize=True, lambda_=1.0)
    assert float(a) == pytest.approx(1.0)  # votes 1 - 0.6 > 0: model 0 only, divided by its weight
    assert float(b) == pytest.approx(-3.0)  # votes 1 - 1.5 < 0: model 1 only


# ---------------------------------------------------------------- recipe checks


def _recipe(**over):
    r = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [{"model": "x", "parameters": {"weight": 0.5, "density": 0.5}}, {"model": "y", "parameters": {"weight": 0.5}}],
        "learn": {"weights": "layer", "steps": 3},
        "calibration": {"x": {"text": "x.txt"}, "y": {"text": "y.txt", "tokens": 256}},
    }
    r.update(over)
    return {k: v for k, v in r.items() if v is not None}


def test_a_learn_recipe_parses():
    r = parse_recipe(_recipe())
    assert r.learn.weights == "layer" and r.learn.steps == 3
    assert r.calibration == {"x": {"text": "x.txt"}, "y": {"text": "y.txt", "tokens": 256}}


@pytest.mark.parametrize(
    "over,message",
    [
        ({"merge_method": "slerp", "parameters": {"t": 0.5}}, "learned weights need a task-vector method"),
        ({"calibration": None}, "learned weights need calibration text"),
        ({"calibration": {"x": "x.stats.safetensors"}}, "a statistics file holds no text"),
        ({"calibration": {"b": {"text": "b.txt"}}}, "the base model takes no calibration entry"),
        ({"calibration": {"z": {"text": "z.txt"}}}, "unknown model 'z' in calibration"),
        ({"learn": {"weights": "layers"}}, "did you mean 'layer'"),
        ({"learn": {"step": 3}}, "did you mean 'steps'"),
        ({"learn": {"steps": -1}}, "steps"),
        ({"learn": {"lr": 0.1}}, "unknown key 'lr'"),
        ({"learn": {"objective": "mean"}}, "unknown learn objective"),
        ({"learn": {"holdout": 1.0}}, "holdout"),
        ({"learn": [1, 2]}, "'learn' must be a mapping"),
    ],
)
def test_bad_learn_recipes_are_one_line_errors(over, message):
    data = _recipe(**over)
    if over.get("merge_method") == "slerp":
        data["models"] = [{"model": "x"}, {"model": "y"}]
    with pytest.raises(RecipeError) as e:
        parse_recipe(data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_learn_refuses_slices():
    data = _recipe(models=None)
    data["slices"] = [{"sources": [{"model": "x", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}]
    with pytest.raises(RecipeError, match="'models:' form"):
        parse_recipe(data)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tuned(llama_trio, tmp_path_factory):
    """DARE-TIES on random fine-tunes, layer-wise, on plain loss (random models have no gain to normalize by)."""
    from splice.engine import run_merge

    base, fts = llama_trio
    root = tmp_path_factory.mktemp("learn")
    texts = []
    for i in range(2):
        t = root / f"text{i}.txt"
        t.write_text(word_docs(40, seed=i))
        texts.append(t)
    recipe = {
        "merge_method": "dare_ties",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 0.4, "density": 0.7}} for f in fts[:2]],
        "learn": {"weights": "layer", "steps": 3, "holdout": 0, "objective": "loss"},
        "calibration": {str(f): {"text": str(t), "tokens": 768, "seq_len": 32} for f, t in zip(fts[:2], texts)},
        "dtype": "float32",
    }
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    s = run_merge(root / "r.yaml", root / "out", seed=7, quiet=True)
    return root, s


def test_the_tuned_recipe_beside_the_model_reproduces_it(tuned):
    from splice.engine import run_merge

    root, s = tuned
    written = yaml.safe_load((root / "out" / "mergekit_config.yml").read_text())
    assert "learn" not in written and "calibration" not in written
    for m in written["models"]:
        rows = m["parameters"]["weight"]
        assert [r["filter"] for r in rows[:-1]] == [f"model.layers.{i}." for i in range(len(rows) - 1)]
        assert "filter" not in rows[-1]  # embeddings, final norm
        assert m["parameters"]["density"] == 0.7
    scores = [x["score"] for x in s["learned"]["scores"]]
    assert scores[-1] > scores[0], "L-BFGS did not lower the training loss"
    assert any(abs(v - 0.4) > 1e-3 for m in s["learned"]["weights"].values() for v in m.values())
    (root / "again.yaml").write_text(yaml.safe_dump(written))
    run_merge(root / "again.yaml", root / "again", seed=7, quiet=True)
    a, b = load_sd(root / "out"), load_sd(root / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def zoo_tuned(tiny_zoo, tmp_path_factory):
    """Task arithmetic at lambda 1 on the tiny zoo (its experts interfere: a poor start), task-wise weights learned."""
    from splice.engine import run_merge

    d, m = tiny_zoo
    root = tmp_path_factory.mktemp("zoo-learn")
    experts = {e: str(d / "models" / e) for e in m["experts"]}
    start = {
        "merge_method": "task_arithmetic",
        "base_model": str(d / "models" / "base"),
        "models": [{"model": p, "parameters": {"weight": 1.0}} for p in experts.values()],
        "dtype": "float32",
    }
    learn = {
        **start,
        "learn": {"weights": "task", "steps": 4, "eval_every": 2},
        "calibration": {p: {"text": str(d / m["domains"][e]["train_file"]), "tokens": 2048, "seq_len": 128} for e, p in experts.items()},
    }
    (root / "start.yaml").write_text(yaml.safe_dump(start))
    (root / "learn.yaml").write_text(yaml.safe_dump(learn))
    run_merge(root / "start.yaml", root / "start", quiet=True)
    s = run_merge(root / "learn.yaml", root / "learned", quiet=True)
    return d, m, root, s, experts


def test_learned_weights_raise_the_held_out_normalized_score(zoo_tuned):
    """On text it never saw (the zoo's held-out split), the learned merge keeps more of the experts' gains than its start."""
    from splice.eval import evaluate

    d, m, root, s, experts = zoo_tuned
    assert s["learned"]["best_step"] > 0
    res = evaluate(
        [str(d / "models" / "base"), *experts.values(), str(root / "start"), str(root / "learned")],
        domains={e: str(d / m["domains"][e]["heldout_file"]) for e in experts},
        max_tokens=2048,
        quiet=True,
        base=str(d / "models" / "base"),
        experts={e: e for e in experts},
        names={
            str(d / "models" / "base"): "base",
            **{p: e for e, p in experts.items()},
            str(root / "start"): "start",
            str(root / "learned"): "learned",
        },
    )
    start, learned = (res["models"][k]["scores"]["normalized"] for k in ("start", "learned"))
    assert learned > start + 0.1, (start, learned)  # measured: -0.26 -> -0.11 in 4 steps on 2k tokens


def test_the_score_it_reports_is_the_written_models(zoo_tuned):
    """The held-out score measured inside the tuning (on the differentiable merge) is that of the model written."""
    import transformers

    from splice.calibration.learn import DEFAULT_HOLDOUT, _mean_loss, _windows
    from splice.hf import load_causal_lm

    d, m, root, s, experts = zoo_tuned
    learned = s["learned"]
    best = max(x["score"] for x in learned["scores"])
    assert [x["score"] for x in learned["scores"] if x["step"] == learned["best_step"]] == [best]
    recipe = parse_recipe(yaml.safe_load((root / "learn.yaml").read_text()))
    tok = transformers.AutoTokenizer.from_pretrained(d / "models" / "base")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    loss = {}
    for name, folder in {"base": d / "models" / "base", "merged": root / "learned", **{p: p for p in experts.values()}}.items():
        model = load_causal_lm(folder)
        for p in experts.values():
            wins = _windows(tok, recipe.calibration[p], p, recipe)
            held = wins[: max(1, round(len(wins) * DEFAULT_HOLDOUT))]
            loss[name, p] = _mean_loss(model, held, pad, 8, torch.device("cpu"))
    got = sum((loss["base", p] - loss["merged", p]) / (loss["base", p] - loss[p, p]) for p in experts.values()) / len(experts)
    assert got == pytest.approx(best, abs=1e-4)
