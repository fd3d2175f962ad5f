"""The optimizer registry: names, did-you-mean, and proposals that a seed fixes (what resume relies on)."""

import pytest

from splice.registry import UnknownName
from splice.search import OPTIMIZERS, SearchError
from splice.search.space import MergeSpace
from splice.search.spec import parse_spec


def space(tmp_path, methods=("linear", "ties"), **extra):
    text = tmp_path / "held.txt"
    text.write_text("x\n")
    data = {
        "models": {"base": "b", "experts": {"a": "x", "c": "y"}},
        "evaluation": {"domains": {"a": str(text), "c": str(text)}},
        "space": {"methods": list(methods), **extra},
    }
    return MergeSpace(parse_spec(data, folder=tmp_path), 4)


def toy(params):
    """A smooth score: best with every number at 0.3, and ties a little better than linear."""
    nums = [v for k, v in params.items() if k != "method"]
    return -sum((v - 0.3) ** 2 for v in nums) + (0.2 if params.get("method", "ties") == "ties" else 0.0)


def run(opt, n, objectives=1):
    out = []
    for _ in range(n):
        p = opt.ask()
        v = toy(p)
        opt.tell(p, [v] * objectives)
        out.append((p, v))
    return out


def test_registry_names_and_did_you_mean():
    assert OPTIMIZERS.names() == ["default", "random", "tpe", "cmaes", "nsga2", "evopress"]
    with pytest.raises(
        UnknownName, match=r"unknown search optimizer 'tpee' \(valid: default, random, tpe, cmaes, nsga2, evopress\); did you mean 'tpe'\?"
    ):
        OPTIMIZERS.get("tpee")


def test_random_search_is_seeded(tmp_path):
    sp = space(tmp_path)
    a = run(OPTIMIZERS.get("random").make(sp, [True], 0), 5)
    assert a == run(OPTIMIZERS.get("random").make(sp, [True], 0), 5)
    assert a != run(OPTIMIZERS.get("random").make(sp, [True], 1), 5)
    for p, _ in a:
        assert all(0.1 <= p[k] <= 1 for k in p if k.startswith("density"))


@pytest.mark.parametrize("name", ["default", "tpe", "cmaes", "nsga2"])
def test_optuna_and_cmaes_optimizers_replay_the_same_trace(tmp_path, name):
    pytest.importorskip("optuna")
    pytest.importorskip("cmaes")
    sp = space(tmp_path)
    a = run(OPTIMIZERS.get(name).make(sp, [True], 7), 12)
    assert a == run(OPTIMIZERS.get(name).make(sp, [True], 7), 12)
    assert a != run(OPTIMIZERS.get(name).make(sp, [True], 8), 12)


def test_default_sweeps_the_methods_then_searches_the_best_one(tmp_path):
    pytest.importorskip("cmaes")
    sp = space(tmp_path)
    trace = run(OPTIMIZERS.get("default").make(sp, [True], 0), 40)
    assert [p for p, _ in trace[:2]] == [sp.start("linear"), sp.start("ties")]  # the hand-tuned sweep first
    assert all(p["method"] == "ties" for p, _ in trace[2:])  # then the best method only
    assert max(v for _, v in trace[2:]) > trace[1][1]  # and CMA-ES improves on its hand-tuned point


def test_failed_trials_are_told_and_the_search_goes_on(tmp_path):
    pytest.importorskip("cmaes")
    for name in ("default", "tpe", "cmaes", "random"):
        opt = OPTIMIZERS.get(name).make(space(tmp_path), [True], 0)
        for i in range(8):
            p = opt.ask()
            opt.tell(p, None if i % 3 == 0 else [toy(p)])


def test_several_objectives(tmp_path):
    pytest.importorskip("optuna")
    sp = space(tmp_path)
    with pytest.raises(SearchError, match="optimizer 'cmaes' follows one objective"):
        OPTIMIZERS.get("cmaes").make(sp, [True, False], 0)
    assert len(run(OPTIMIZERS.get("nsga2").make(sp, [True, False], 0), 5, objectives=2)) == 5
    assert len(run(OPTIMIZERS.get("default").make(sp, [True, False], 0), 5, objectives=2)) == 5
