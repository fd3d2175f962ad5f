"""Space (b), layers to drop, and EvoPress: the mutation keeps the count, a drop set decodes into the recipe
splice skip writes, and a small search on the tiny zoo writes a best.yaml that splice merge turns into the
model that was scored."""

import json

import pytest

from splice.cli import main
from splice.errors import SpliceError
from splice.search import load_spec, read_trials, run_search
from splice.search.drop import DropSpace
from splice.search.evopress import EvoPress
from splice.search.spec import parse_spec
from splice.skip.costs import LayerCosts
from splice.skip.pruning import recipe_for
from splice.skip.strategies import make_plan


def costs(n=8):
    return LayerCosts(n, [100] * n, [60] * n, 50, 100 * n + 80, {i: [f"model.layers.{i}.mlp.down_proj.weight"] for i in range(n)})


def drop_space(tmp_path, drop, n=8, **extra):
    text = tmp_path / "held.txt"
    text.write_text("x\n")
    data = {"models": {"base": "b"}, "evaluation": {"domains": {"a": str(text)}}, "space": {"drop": drop}, **extra}
    return DropSpace(parse_spec(data, folder=tmp_path), costs(n))


def test_level_switch_mutation_keeps_the_count(tmp_path):
    sp = drop_space(tmp_path, {"count": 3})
    sp.seeds = [("balanced", [1, 3, 5])]
    sp.keep = 0.25
    opt = EvoPress(sp, [False], seed=0)
    for _ in range(200):
        child = opt.mutate([1, 3, 5])
        assert len(child) == len(set(child)) == 3 and all(0 <= i < 8 for i in child) and child == sorted(child)
    assert any(opt.mutate([1, 3, 5]) != [1, 3, 5] for _ in range(5))


def test_evopress_seeds_screens_then_rescores_the_best_share(tmp_path):
    sp = drop_space(tmp_path, {"count": 2})
    sp.seeds = [("balanced", [2, 5]), ("block-influence", [6, 7]), ("angular", [6, 7])]
    sp.keep = 0.25
    opt = EvoPress(sp, [False], seed=0, offspring=8)

    def loss(drop):  # lower is better: dropping late layers costs least
        return sum(8 - i for i in drop)

    def step():
        asked = []
        while (got := opt.ask()) is not None:
            asked.append(got)
        for params, _ in asked:
            opt.tell(params, [loss(params["drop"])])
        return asked

    seeds = step()
    assert [(p["drop"], lv) for p, lv in seeds] == [([2, 5], "full"), ([6, 7], "full")]  # each planner's set once, scored in full
    screen = step()
    assert len(screen) == 8 and {lv for _, lv in screen} == {"screen"}
    assert all(len(p["drop"]) == 2 and p["drop"] != [6, 7] for p, _ in screen)  # children keep the count, none is the parent
    assert len({json.dumps(p) for p, _ in screen}) == 8
    full = step()
    best_screen = sorted(loss(p["drop"]) for p, _ in screen)[:2]
    assert [lv for _, lv in full] == ["full", "full"] and sorted(loss(p["drop"]) for p, _ in full) == best_screen
    assert opt.ask()[1] == "screen" and opt.parent == [6, 7]  # no child beat the parent: it stays


def test_a_drop_set_decodes_to_the_recipe_splice_skip_writes(tmp_path):
    sp = drop_space(tmp_path, {"count": 3})
    plan = make_plan(sp.costs, "balanced", drop=3, model=sp.spec.base)
    ours = sp.decode({"drop": plan.drop_layers})
    theirs = recipe_for(plan, sp.costs.mlp_output)
    assert ours["slices"] == theirs["slices"] and ours["merge_method"] == theirs["merge_method"] == "passthrough"
    assert drop_space(tmp_path, {"speedup": 1.5}).count == 3  # (850 / (850 - 100 k) >= 1.5 from k = 3)


def test_drop_spec_errors(tmp_path):
    text = tmp_path / "held.txt"
    text.write_text("x\n")
    base = {"models": {"base": "b"}, "evaluation": {"domains": {"a": str(text)}}}
    with pytest.raises(SpliceError, match=r"space.drop: give exactly one of count"):
        parse_spec({**base, "space": {"drop": {"count": 2, "speedup": 1.2}}}, folder=tmp_path)
    with pytest.raises(SpliceError, match=r"space.drop.cont: unknown key 'cont'.*did you mean 'count'"):
        parse_spec({**base, "space": {"drop": {"cont": 2}}}, folder=tmp_path)
    with pytest.raises(SpliceError, match=r"space.methods: a drop space prunes the base model"):
        parse_spec({**base, "space": {"drop": {"count": 2}, "methods": ["ties"]}}, folder=tmp_path)
    with pytest.raises(SpliceError, match=r"optimizer: optimizer 'tpe' searches merge parameters; a drop space is searched by evopress"):
        parse_spec({**base, "space": {"drop": {"count": 2}}, "optimizer": "tpe"}, folder=tmp_path)
    with pytest.raises(SpliceError, match=r"objective 'mean' scores against the experts' gains and the spec has no experts"):
        parse_spec({**base, "space": {"drop": {"count": 2}}, "objective": "mean"}, folder=tmp_path)
    with pytest.raises(SpliceError, match=r"space.drop.count 8: the base has 8 layers"):
        drop_space(tmp_path, {"count": 8})
    assert parse_spec({**base, "space": {"drop": {"count": 2}}}, folder=tmp_path).objectives == ["loss"]


def test_a_drop_search_on_the_tiny_zoo_gives_a_recipe_splice_merge_writes(tiny_zoo, tmp_path):
    zoo, _ = tiny_zoo
    spec = tmp_path / "drop.yaml"
    spec.write_text(  # the base alone (no experts to load): the objective is the mean held-out loss
        f"models: {{base: {zoo}/models/base}}\n"
        f"evaluation: {{domains: {{code: {zoo}/data/code/heldout.txt, news: {zoo}/data/news/heldout.txt}}, tokens: 128, seq_len: 64}}\n"
        "space: {drop: {count: 2}}\nthreads: 1\n"
    )
    out = tmp_path / "st"
    s = run_search(spec, out, budget=7, quiet=True)
    records = read_trials(out / "trials.jsonl")
    assert len(records) == 7 and all(len(r["params"]["drop"]) == 2 for r in records)
    assert {r["level"] for r in records} == {"full", "screen"}
    assert s["best"]["level"] == "full" and s["best"]["values"][0] == min(r["values"][0] for r in records if r["level"] == "full")
    assert s["best"]["values"][0] == pytest.approx(sum(s["best"]["losses"].values()) / 2)  # objective loss: the mean over domains
    names = [r["model"] for r in s["leaderboard"]["rows"]]
    assert "splice skip block-influence" in names and "splice skip angular" in names
    # best.yaml is the pruned model: splice merge writes it, and it scores what the leaderboard says on the test split
    merged = tmp_path / "pruned"
    assert main(["merge", str(out / "best.yaml"), "-o", str(merged), "-q"]) == 0
    assert json.loads((merged / "config.json").read_text())["num_hidden_layers"] == 2
    from splice.eval.perplexity import read_text
    from splice.search.resident import ResidentModel
    from splice.search.splits import make_splits

    sp = load_spec(spec)
    model = ResidentModel(str(merged), [], threads=1, batch_size=sp.batch_size)
    try:
        splits = make_splits(model.tokenizer, {d: read_text(p) for d, p in sp.domains.items()}, sp.seq_len, sp.search_share, sp.tokens)
        losses = model.losses(splits.test)
    finally:
        model.close()
    assert losses == pytest.approx(s["leaderboard"]["rows"][0]["losses"], abs=2e-5)


def test_evopress_is_seeded_and_does_not_depend_on_the_order_results_come_back(tmp_path):
    sp = drop_space(tmp_path, {"count": 3})
    sp.seeds = [("balanced", [1, 3, 5]), ("angular", [4, 5, 6])]
    sp.keep = 0.25

    def run(seed, reverse):
        opt = EvoPress(sp, [False], seed=seed, offspring=6)
        trace = []
        for _ in range(6):  # seeds, screen, re-score, ... : each step asked whole, then told
            asked = []
            while (got := opt.ask()) is not None:
                asked.append(got)
            trace.append(sorted(json.dumps(p) + lv for p, lv in asked))
            for p, _ in reversed(asked) if reverse else asked:
                opt.tell(p, [float(sum(p["drop"]) % 7)])
        return trace

    assert run(0, False) == run(0, True)  # workers may return a step's results in any order
    assert run(0, False) != run(1, False)
