"""splice demo on the tiny zoo: every applicable method merged, evaluated and ranked."""

import json

import pytest


def test_demo_json_has_every_method(tiny_zoo, tmp_path):
    from splice.errors import SpliceError
    from splice.zoo.demo import applicable_methods, run_demo

    d, m = tiny_zoo
    res = run_demo("tiny", tmp_path / "demo", zoo_dir=d, quiet=True, parts="merge,moe,skip")
    data = json.loads((tmp_path / "demo" / "leaderboard.json").read_text())
    want = {mm.name for mm in applicable_methods(len(m["experts"]))}
    assert set(data["methods"]) == want
    assert not data["skipped"], data["skipped"]
    merged = {r["method"] for r in data["models"].values() if r["kind"] == "merge"}
    assert merged == want
    for name, r in data["models"].items():
        assert set(r["domains"]) == set(m["domains"]), name
        assert "normalized" in r["scores"] and "forgetting" in r["scores"]
    assert data["winner"] == data["ranking"][0]
    assert data["winner"] in res["summary"]
    assert res["table"].count("\n") >= len(data["models"])
    try:
        import matplotlib  # noqa: F401

        assert (tmp_path / "demo" / "leaderboard.png").stat().st_size > 1000
    except ImportError:
        pass
    # a rerun reuses merges and evaluations
    import time

    before = (tmp_path / "demo" / "leaderboard.json").read_bytes()
    with pytest.raises(SpliceError, match=r"demo exists and is not empty; pass force=True"):
        run_demo("tiny", tmp_path / "demo", zoo_dir=d, quiet=True, chart=False, parts="merge,moe,skip")  # results are not replaced unasked
    assert (tmp_path / "demo" / "leaderboard.json").read_bytes() == before
    t0 = time.time()
    again = run_demo("tiny", tmp_path / "demo", zoo_dir=d, quiet=True, chart=False, force=True, parts="merge,moe,skip")
    assert time.time() - t0 < 60  # nothing is retrained or re-evaluated
    assert again["ranking"] == data["ranking"]


def test_demo_moe_and_skip_parts_report_measured_numbers(tiny_zoo, tmp_path):
    """One merge method and all three parts: the MoE and skip reports hold measured numbers, and the closing lines quote them."""
    import time

    from splice.errors import SpliceError
    from splice.zoo.demo import run_demo

    d, m = tiny_zoo
    out = tmp_path / "demo"
    with pytest.raises(SpliceError, match=r"^parts=merge,mix: unknown part 'mix' \(valid parts: merge, search, moe, skip\)$"):
        run_demo("tiny", out, zoo_dir=d, quiet=True, parts="merge,mix")
    assert not out.exists()  # refused before any work

    res = run_demo("tiny", out, zoo_dir=d, quiet=True, methods=["linear"], parts="skip,moe,merge")
    assert res["parts"] == ["merge", "moe", "skip"]  # in run order
    board = json.loads((out / "leaderboard.json").read_text())
    moe = json.loads((out / "moe.json").read_text())
    skip = json.loads((out / "skip.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    layers = m["tier_config"]["model"]["num_hidden_layers"]

    # moe: routing accuracy per expert domain, normalized scores, parameters
    assert moe["experts"] == m["experts"]
    for dom in m["experts"]:
        r = moe["routing"][dom]
        assert 0.0 <= r["mean"] <= 1.0
        assert len(r["per_layer"]) == layers and all(0.0 <= x <= 1.0 for x in r["per_layer"])
    assert 0.0 <= moe["routing_accuracy"] <= 1.0
    assert set(moe["scores"]["per_domain"]) == set(m["experts"])
    assert isinstance(moe["scores"]["normalized"], float) and moe["scores"]["min_normalized"] <= moe["scores"]["normalized"]
    assert set(moe["losses"]) == set(m["domains"])
    assert moe["dense_params"] < moe["active_params"] < moe["params"]  # top-2 of 3 experts
    assert moe["best_merge"]["name"] == board["winner"]
    assert moe["best_merge"]["scores"] == board["models"][board["winner"]]["scores"]

    # skip: each plan drops the stated number of layers and was timed against the full model
    assert skip["num_layers"] == layers and skip["plans"]
    for p in skip["plans"]:
        assert len(p["drop_layers"]) == p["drop"] and sorted(p["drop_layers"] + p["kept_layers"]) == list(range(layers))
        cfg = json.loads((out / "skip" / f"drop-{p['drop']}" / "config.json").read_text())
        assert cfg["num_hidden_layers"] == layers - p["drop"]
        assert p["decode"]["base_tps"] > 0 and p["decode"]["tps"] > 0 and p["decode"]["speedup"] > 0
        assert set(p["loss_delta"]) == set(m["domains"])
        for dom, delta in p["loss_delta"].items():
            assert delta == pytest.approx(p["loss"][dom] - skip["base"]["loss"][dom], abs=1e-4)

    # the closing lines quote this run's numbers
    assert summary == res["closing"]
    merge_line, moe_line, skip_line = summary["lines"]
    w = board["models"][board["winner"]]["scores"]
    assert board["winner"] in merge_line and f"keeps {100 * w['normalized']:.0f}%" in merge_line
    assert f"(worst domain {100 * w['min_normalized']:.0f}%)" in merge_line
    assert f"keeps {100 * moe['scores']['normalized']:.0f}%" in moe_line
    assert f"{100 * moe['routing_accuracy']:.0f}% of each domain's tokens" in moe_line
    for p in skip["plans"]:
        assert f"dropping {p['drop']} of {layers} layers gives {p['decode']['speedup']:.2f}x decode" in skip_line
        assert f"at {p['mean_loss_delta_pct']:+.1f}% held-out loss" in skip_line
    try:
        import matplotlib  # noqa: F401

        for name in ("leaderboard", "moe", "skip"):
            assert (out / f"{name}.png").stat().st_size > 1000, name
    except ImportError:
        pass

    # a rerun reuses the MoE, the plans, the pruned models, their evaluations and their timings
    before = {n: (out / n).read_bytes() for n in ("moe.json", "skip.json", "summary.json")}
    t0 = time.time()
    run_demo("tiny", out, zoo_dir=d, quiet=True, methods=["linear"], chart=False, force=True, parts="merge,moe,skip")
    assert time.time() - t0 < 30
    assert {n: (out / n).read_bytes() for n in before} == before


def test_demo_search_part_ranks_the_searched_recipe(tiny_zoo, tmp_path):
    """The search part: a study of the budget's trials, its best merged and evaluated like the merges, ranked, quoted, reused."""
    from splice.eval import normalized_scores
    from splice.recipe import load_recipe
    from splice.search import read_trials
    from splice.zoo.demo import rank_key, run_demo

    d, m = tiny_zoo
    out = tmp_path / "demo"
    budget = 6
    res = run_demo("tiny", out, zoo_dir=d, quiet=True, parts=["merge", "search"], methods=["linear", "ties"], search_budget=budget)
    assert res["parts"] == ["merge", "search"]
    se = json.loads((out / "search.json").read_text())
    board = json.loads((out / "leaderboard.json").read_text())

    # the study ran the budget, and its best is an ordinary recipe file
    trials = read_trials(out / "search" / "study" / "trials.jsonl")
    assert se["trials"] == budget == len(trials) == len(se["trace"])
    rec = load_recipe(se["best_recipe"])
    assert rec.merge_method == se["method"] in ("linear", "task_arithmetic", "ties", "dare_ties")
    best_values = [t["values"][0] for t in trials if t["status"] == "ok"]
    assert se["search_split"]["objective"] == max(best_values) == se["trace"][-1]["best_so_far"]
    assert {"search", "test", "demo"} <= set(se["splits"])

    # its demo-evaluation score is the leaderboard's formula applied to the eval cache's losses
    cache = list(json.loads((out / "eval-cache.json").read_text()).values())
    loss_of = {r["path"]: {dom: v["loss"] for dom, v in r["domains"].items()} for r in cache}
    zoo_models = {n: str(d / v["path"]) for n, v in m["models"].items()}
    losses = {"base": loss_of[zoo_models["base"]], "searched": loss_of[se["path"]]}
    losses.update({f"expert:{e}": loss_of[zoo_models[e]] for e in m["experts"]})
    want = normalized_scores(losses, "base", {e: f"expert:{e}" for e in m["experts"]}, m["general_domain"])["searched"]
    assert se["scores"]["normalized"] == want["normalized"] and se["scores"]["min_normalized"] == want["min_normalized"]
    assert se["scores"]["forgetting"] == want["forgetting"]

    # rank among the merge leaderboard's entries, and the best hand-tuned data-free merge beside it
    c = se["comparison"]
    ahead = [n for n in board["ranking"] if rank_key(board["models"][n]["scores"]) < rank_key(se["scores"])]
    assert c["rank"] == len(ahead) + 1 and c["of"] == len(board["ranking"]) + 1
    hand = c["best_hand_tuned"]
    assert hand["name"] == board["ranking"][0]  # both methods here are data-free
    assert hand["normalized"] == board["models"][hand["name"]]["scores"]["normalized"]

    # the closing line quotes search.json's numbers
    line = next(ln for ln in res["closing"]["lines"] if ln.startswith("Searched:"))
    s = se["scores"]
    assert line.startswith(f"Searched: {budget} trials found {se['label']} keeping {100 * s['normalized']:.0f}%")
    unseen = next(r["scores"] for r in se["test_split"]["rows"] if r["model"].startswith("best"))
    assert (
        f"(worst domain {100 * s['min_normalized']:.0f}%) ({100 * unseen['normalized']:.0f}%, worst "
        f"{100 * unseen['min_normalized']:.0f}%, on held-out text the search never saw), rank {c['rank']} of {c['of']} on the merge leaderboard"
    ) in line
    assert f"{hand['name']}, keeps {100 * hand['normalized']:.0f}% (worst domain {100 * hand['min_normalized']:.0f}%)" in line
    assert json.loads((out / "summary.json").read_text())["numbers"]["search"]["rank"] == c["rank"]
    try:
        import matplotlib  # noqa: F401

        assert (out / "search.png").stat().st_size > 1000
    except ImportError:
        pass

    # a rerun reuses the finished study (no new trial) and the merged, evaluated best
    before = (out / "search" / "study" / "trials.jsonl").read_bytes()
    again = run_demo(
        "tiny", out, zoo_dir=d, quiet=True, parts=["merge", "search"], methods=["linear", "ties"], search_budget=budget, force=True
    )
    assert again["search"]["reused_study"] and (out / "search" / "study" / "trials.jsonl").read_bytes() == before
    assert again["search"]["scores"] == se["scores"] and again["search"]["seconds"]["search_runs"] == se["seconds"]["search_runs"]
