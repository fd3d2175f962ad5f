"""splice demo on the tiny zoo: every applicable method merged, evaluated and ranked."""

import json

import pytest


def test_demo_json_has_every_method(tiny_zoo, tmp_path):
    from splice.errors import SpliceError
    from splice.zoo.demo import applicable_methods, run_demo

    d, m = tiny_zoo
    res = run_demo("tiny", tmp_path / "demo", zoo_dir=d, quiet=True)
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
        run_demo("tiny", tmp_path / "demo", zoo_dir=d, quiet=True, chart=False)  # results are not replaced unasked
    assert (tmp_path / "demo" / "leaderboard.json").read_bytes() == before
    t0 = time.time()
    again = run_demo("tiny", tmp_path / "demo", zoo_dir=d, quiet=True, chart=False, force=True)
    assert time.time() - t0 < 60  # nothing is retrained or re-evaluated
    assert again["ranking"] == data["ranking"]
