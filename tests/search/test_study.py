"""Studies on the tiny zoo: a search that writes best.yaml (which splice merge runs), resume with the same
trace, and the study folder's refusal rules. Few trials, few tokens."""

import json

import pytest

from splice.cli import main
from splice.errors import SpliceError
from splice.eval.perplexity import read_text
from splice.search import SearchOptions, load_spec, read_trials, run_search, trace
from splice.search.resident import ResidentModel
from splice.search.splits import make_splits

SPEC = """\
zoo: {zoo}
evaluation:
  tokens: 192
  seq_len: 64
space:
  methods: [linear, ties]
  granularity: {{groups: 2}}
objective: mean
seed: 0
threads: 1  # one torch thread: on a shared 2-core machine two threads are many times slower
"""


@pytest.fixture(scope="module")
def spec(tiny_zoo, tmp_path_factory):
    zoo, _ = tiny_zoo
    p = tmp_path_factory.mktemp("spec") / "search.yaml"
    p.write_text(SPEC.format(zoo=zoo))
    return p


@pytest.fixture(scope="module")
def study(spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "st"
    return out, run_search(spec, out, budget=3, optimizer="random", quiet=True)


def test_a_search_records_every_trial_and_writes_best_yaml(study, spec):
    out, s = study
    records = read_trials(out / "trials.jsonl")
    assert len(records) == s["trials"] == 3
    for r in records:
        assert set(r) >= {"trial", "params", "recipe", "losses", "scores", "values", "seconds", "seed", "status"}
        assert r["status"] == "ok" and set(r["losses"]) == {"code", "news", "scripture", "shakespeare", "general"}
        assert r["values"] == [r["scores"]["normalized"]]
    best = max(records, key=lambda r: r["values"][0])
    assert s["best"]["trial"] == best["trial"]
    assert json.loads((out / "best.json").read_text())["recipe"] == best["recipe"]
    assert (out / "best.yaml").read_text().startswith(f"# splice search: trial {best['trial']} of study")
    board = s["leaderboard"]
    assert board["split"] == "test"
    assert [r["model"] for r in board["rows"]] == [
        f"best (trial {best['trial']})",
        "base",
        "expert code",
        "expert news",
        "expert scripture",
        "hand-tuned linear",
        "hand-tuned ties",
    ]
    base_row = board["rows"][1]["scores"]
    assert base_row["normalized"] == 0 and base_row["forgetting"] == 0


def test_best_yaml_is_a_recipe_splice_merge_runs_and_gives_the_scored_model(study, spec, tmp_path):
    out, s = study
    merged = tmp_path / "merged"
    assert main(["merge", str(out / "best.yaml"), "-o", str(merged), "-q"]) == 0
    # the merged folder, scored on the same test windows, has the losses the leaderboard gives the best trial
    sp = load_spec(spec)
    model = ResidentModel(str(merged), [], threads=1, batch_size=sp.batch_size)
    try:
        texts = {d: read_text(p) for d, p in sp.domains.items()}
        splits = make_splits(model.tokenizer, texts, sp.seq_len, sp.search_share, sp.tokens)
        losses = model.losses(splits.test)
    finally:
        model.close()
    assert losses == pytest.approx(s["leaderboard"]["rows"][0]["losses"], abs=2e-6)


@pytest.mark.parametrize("optimizer", ["random", "default"])
def test_resume_gives_the_trace_of_an_uninterrupted_study(spec, tmp_path, optimizer):
    if optimizer == "default":
        pytest.importorskip("cmaes")
    whole = tmp_path / "whole"
    run_search(spec, whole, budget=4, optimizer=optimizer, quiet=True, leaderboard=False)
    part = tmp_path / "part"
    run_search(spec, part, budget=2, optimizer=optimizer, quiet=True, leaderboard=False)
    with open(part / "trials.jsonl", "a") as f:
        f.write('{"trial": 3, "params": {"meth')  # killed while writing trial 3: that trial runs again
    run_search(spec, part, budget=4, optimizer=optimizer, resume=True, quiet=True, leaderboard=False)
    assert trace(read_trials(part / "trials.jsonl")) == trace(read_trials(whole / "trials.jsonl"))
    assert len(read_trials(part / "trials.jsonl")) == 4


def test_study_folder_rules(spec, study, tmp_path):
    out, _ = study
    with pytest.raises(
        SpliceError, match=r"study folder .* exists and is not empty; pass resume=True to continue it or force=True to start over"
    ):
        run_search(spec, out, budget=1, optimizer="random", quiet=True)
    with pytest.raises(SpliceError, match=r"no study to resume"):
        run_search(spec, tmp_path / "none", budget=1, resume=True, quiet=True)
    with pytest.raises(SpliceError, match=r"the study was run with seed 0, not 5; refusing to resume it"):
        run_search(spec, out, budget=4, optimizer="random", seed=5, resume=True, quiet=True)
    with pytest.raises(SpliceError, match=r"the study was run with optimizer 'random', not 'tpe'"):
        run_search(spec, out, budget=4, optimizer="tpe", resume=True, quiet=True)
    other = tmp_path / "other.yaml"
    other.write_text(spec.read_text().replace("groups: 2", "groups: 3"))
    with pytest.raises(SpliceError, match=r"is a study of another spec .*; refusing to resume it"):
        run_search(other, out, budget=4, optimizer="random", resume=True, quiet=True)
    with pytest.raises(SpliceError, match=r"resume=True continues a study and force=True starts it over; give one"):
        SearchOptions(resume=True, force=True)
    with pytest.raises(SpliceError, match=r"budget=0: must be"):
        SearchOptions(budget=0)
    with pytest.raises(SpliceError, match=r"no budget"):
        run_search(spec, tmp_path / "nobudget", quiet=True)
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    with pytest.raises(SpliceError, match=r"holds files that are not a study's \(notes.txt\)"):
        run_search(spec, tmp_path / "stranger", budget=1, force=True, quiet=True)
    assert not (tmp_path / "none").exists() and not (tmp_path / "nobudget").exists()


def test_force_starts_a_study_over(spec, tmp_path):
    out = tmp_path / "st"
    run_search(spec, out, budget=2, optimizer="random", quiet=True, leaderboard=False)
    run_search(spec, out, budget=1, optimizer="random", seed=1, force=True, quiet=True, leaderboard=False)
    assert len(read_trials(out / "trials.jsonl")) == 1
    assert json.loads((out / "study.json").read_text())["seed"] == 1


def test_cli_search_prints_progress_and_the_test_leaderboard(spec, tmp_path, capsys):
    out = tmp_path / "st"
    best = tmp_path / "best"
    assert (
        main(["search", str(spec), "-o", str(out), "--budget", "2", "--optimizer", "random", "--seed", "3", "--write-best", str(best)]) == 0
    )
    cap = capsys.readouterr()
    assert f"best model written to {best}" in cap.out and (best / "config.json").exists() and (best / "model.safetensors").exists()
    assert "trial 1/2 " in cap.err and "trial 2/2 " in cap.err and "s/eval" in cap.err and "best " in cap.err
    assert "test split" in cap.out and "base" in cap.out and "expert code" in cap.out and "best (trial" in cap.out
    assert f"{out}/best.yaml" in cap.out
    assert main(["search", str(spec), "-o", str(out), "--budget", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("splice: error: study folder") and "--resume" in err and "--force" in err and "\n" not in err
    assert main(["search", str(spec), "-o", str(out), "--budget", "0"]) == 2
    assert main(["search", str(spec), "-o", str(tmp_path / "st2"), "--budget", "1", "--write-best", str(best)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err and not (tmp_path / "st2").exists()  # refused before searching
    assert main(["search", str(spec), "-o", str(out), "--optimizer", "cmaess", "--resume"]) == 2
    assert "did you mean 'cmaes'?" in capsys.readouterr().err


def test_several_objectives_write_a_pareto_front(spec, tmp_path):
    pytest.importorskip("optuna")
    out = tmp_path / "st"
    run_search(spec, out, budget=3, optimizer="nsga2", objectives="mean,forgetting", quiet=True, leaderboard=False)
    front = json.loads((out / "pareto.json").read_text())
    assert front["objectives"] == ["mean", "forgetting"] and 1 <= len(front["front"]) <= 3
    assert set(front["front"][0]["values"]) == {"mean", "forgetting"}


def test_a_failed_set_up_writes_nothing(llama_trio, tmp_path):
    base, fts = llama_trio
    text = tmp_path / "held.txt"
    text.write_text(" ".join(f"t{3 + i % 90}" for i in range(400)))
    spec = tmp_path / "s.yaml"
    spec.write_text(
        f"models: {{base: {base}, experts: {{a: {fts[0]}, b: {fts[1]}}}}}\n"
        f"evaluation: {{domains: {{a: {text}, b: {text}}}, seq_len: 32}}\nspace: {{methods: [linear]}}\nbudget: 2\n"
    )
    with pytest.raises(SpliceError, match=r"expert '(a|b)' is no better than the base on its own domain's search split"):
        run_search(spec, tmp_path / "st", optimizer="random", quiet=True)
    assert not (tmp_path / "st").exists()


def test_two_workers_share_one_study_asynchronously_and_a_dead_worker_fails_only_its_trial(tiny_zoo, tmp_path, monkeypatch):
    from splice.search import workers

    zoo, _ = tiny_zoo
    small = tmp_path / "small.yaml"  # one expert and one domain: each worker loads two tiny models
    small.write_text(
        f"models: {{base: {zoo}/models/base, experts: {{code: {zoo}/models/code}}}}\n"
        f"evaluation: {{domains: {{code: {zoo}/data/code/heldout.txt}}, tokens: 128, seq_len: 64}}\n"
        "space: {methods: [linear, ties]}\nseed: 0\nthreads: 2\n"
    )
    real = workers.ProcessPool.submit

    def submit(self, task):  # the worker handed trial 2 is killed while it evaluates it
        real(self, task)
        if task.number == 2:
            next(w for w in self.workers if w["task"] is task)["proc"].kill()

    monkeypatch.setattr(workers.ProcessPool, "submit", submit)
    out = tmp_path / "st"
    s = run_search(small, out, budget=3, optimizer="random", workers=2, quiet=True, leaderboard=False)
    records = {r["trial"]: r for r in read_trials(out / "trials.jsonl")}
    asks = read_trials(out / "asks.jsonl")
    assert s["trials"] == 3 and sorted(records) == [1, 2, 3]
    # both workers were handed a candidate before either result was told: asynchronous, no generation
    assert [a["told"] for a in asks[:2]] == [0, 0]
    assert records[2]["status"] == "failed" and "worker process died" in records[2]["error"]
    # random search proposes the same candidates whatever the worker count, each scored as one worker scores it
    monkeypatch.undo()
    one = tmp_path / "one"
    run_search(small, one, budget=3, optimizer="random", quiet=True, leaderboard=False)
    by_trial = {r["trial"]: r for r in read_trials(one / "trials.jsonl")}
    for n in (1, 3):
        assert records[n]["status"] == "ok" and records[n]["params"] == by_trial[n]["params"]
        assert records[n]["values"] == pytest.approx(by_trial[n]["values"], abs=1e-5)


def test_resume_runs_a_candidate_asked_and_never_finished_again(spec, study, tmp_path):
    import shutil

    from splice.search import OPTIMIZERS
    from splice.search.space import MergeSpace

    out = tmp_path / "st"
    shutil.copytree(study[0], out)
    opt = OPTIMIZERS.get("random").make(MergeSpace(load_spec(spec), 4), [True], 0)
    fourth = [opt.ask() for _ in range(4)][-1]
    with open(out / "asks.jsonl", "a") as f:  # killed while trial 4 was out
        f.write(json.dumps({"trial": 4, "told": 3, "params": fourth}) + "\n")
    run_search(spec, out, budget=4, optimizer="random", resume=True, quiet=True, leaderboard=False)
    records = read_trials(out / "trials.jsonl")
    assert [r["trial"] for r in records] == [1, 2, 3, 4] and records[3]["params"] == fourth and records[3]["status"] == "ok"
    assert len(read_trials(out / "asks.jsonl")) == 4
    with open(out / "asks.jsonl", "a") as f:  # an ask the optimizer would not make
        f.write(json.dumps({"trial": 5, "told": 4, "params": fourth}) + "\n")
    with pytest.raises(SpliceError, match=r"asks.jsonl:5: the optimizer proposes another candidate than the recorded trial 5"):
        run_search(spec, out, budget=5, optimizer="random", resume=True, quiet=True, leaderboard=False)


def test_promotion_rescores_the_best_share_of_screens_so_far():
    from splice.search.fidelity import Promotion
    from splice.search.spec import Fidelity
    from splice.search.study import Trial

    rule = Promotion(Fidelity(keep=0.5), up=True)
    assert rule.threshold() is True  # the first candidates are always re-scored
    for v in (0.1, 0.5, 0.3):
        rule.add(Trial(0, {}, {}, values=[v], level="screen"))
    assert rule.threshold() == 0.3  # 4 candidates with this one: it must be among the best 2
    rule.add(Trial(0, {}, {}, values=[0.9], level="full", screen={"values": [0.7], "losses": {}}))  # a re-scored one counts its screen
    assert rule.seen == [0.1, 0.5, 0.3, 0.7] and rule.threshold() == 0.3
    low = Promotion(Fidelity(keep=0.25), up=False)
    for v in (4.0, 3.0, 5.0, 6.0):
        low.add(Trial(0, {}, {}, values=[v], level="screen"))
    assert low.threshold() == 4.0  # 5 with this one, ceil(0.25 * 5) = 2 may pass: it must beat all but the best


def test_a_fidelity_screens_every_candidate_and_rescores_the_promising_ones(spec, study, tmp_path):
    fid = tmp_path / "fid.yaml"
    fid.write_text(spec.read_text() + "fidelity: {screen_tokens: 64, keep: 0.5}\n")
    out = tmp_path / "st"
    s = run_search(fid, out, budget=3, optimizer="random", quiet=True, leaderboard=False)
    records = read_trials(out / "trials.jsonl")
    assert [a["level"] for a in read_trials(out / "asks.jsonl")] == ["screen"] * 3
    first = records[0]
    assert first["level"] == "full" and set(first["screen"]) == {"values", "losses"}  # the first is always re-scored
    # re-scored on every search token: the value a study without a fidelity gives the same candidate
    plain = read_trials(study[0] / "trials.jsonl")[0]
    assert first["params"] == plain["params"] and first["values"] == pytest.approx(plain["values"], abs=1e-6)
    assert s["best"]["level"] == "full"
    assert all(r["level"] == "screen" and "screen" not in r or r["level"] == "full" for r in records)
