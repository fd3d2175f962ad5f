"""The search spec: what it accepts, and one-line errors with the file and line for what it refuses."""

import pytest

from splice.errors import SpliceError
from splice.search import load_spec
from splice.search.spec import parse_time


@pytest.fixture
def files(tmp_path):
    """A spec folder with model folders and held-out files (the spec only checks the text files exist)."""
    for d in ("a", "b", "g"):
        (tmp_path / f"{d}.txt").write_text("some held-out text\n")
    return tmp_path


GOOD = """\
models:
  base: base
  experts: {a: ma, b: mb}
evaluation:
  domains: {a: a.txt, b: b.txt, g: g.txt}
  general: g
space:
  methods: [linear, ties]
  granularity: {groups: 3}
  split_attention_mlp: true
  params:
    weight: [0.2, 1]
    lambda: [0.5, 1.5]
    normalize: true
budget: 7
time: 30m
seed: 3
"""


def write(folder, text):
    p = folder / "search.yaml"
    p.write_text(text)
    return p


def test_a_good_spec_resolves_paths_and_fills_defaults(files):
    s = load_spec(write(files, GOOD))
    assert s.base == str(files / "base") and s.experts == {"a": str(files / "ma"), "b": str(files / "mb")}
    assert s.domains["g"] == str(files / "g.txt") and s.general == "g"
    assert s.space.methods == ["linear", "ties"] and s.space.granularity == "groups" and s.space.groups == 3
    assert s.space.split_attention_mlp
    p = s.space.params
    assert (p["weight"].low, p["weight"].high) == (0.2, 1.0)
    assert (p["density"].low, p["density"].high) == (0.1, 1.0)  # searched by default for ties
    assert p["normalize"].fixed is True and not p["normalize"].searched
    assert s.objectives == ["mean"] and s.optimizer == "default"
    assert (s.budget, s.time, s.seed) == (7, 1800.0, 3)
    assert s.search_share == 0.5 and s.fidelity is None
    f = load_spec(write(files, GOOD + "fidelity: {screen_tokens: 128, full_tokens: 1024}\n")).fidelity
    assert (f.screen_tokens, f.full_tokens, f.keep) == (128, 1024, 0.25)


def test_fingerprint_ignores_budget_and_seed_but_not_the_space(files):
    a = load_spec(write(files, GOOD)).fingerprint()
    assert load_spec(write(files, GOOD.replace("budget: 7", "budget: 70").replace("seed: 3", "seed: 4"))).fingerprint() == a
    assert load_spec(write(files, GOOD.replace("[0.2, 1]", "[0.3, 1]"))).fingerprint() != a


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("budget: 7", "budgt: 7", r"search.yaml:15: budgt: unknown key 'budgt' in the search spec \(valid: .*\); did you mean 'budget'\?"),
        (
            "  split_attention_mlp: true",
            "  split_attention: true",
            r"search.yaml:10: space.split_attention: unknown key .*did you mean 'split_attention_mlp'\?",
        ),
        (
            "    lambda: [0.5, 1.5]",
            "    lamda: [0.5, 1.5]",
            r"search.yaml:13: space.params.lamda: unknown parameter 'lamda' in the space .*did you mean 'lambda'\?",
        ),
        (
            "    lambda: [0.5, 1.5]",
            "    gamma: [0, 0.1]",
            r"search.yaml:13: space.params.gamma: parameter 'gamma' is not taken by any of the space's methods",
        ),
        ("[linear, ties]", "[linear, tiess]", r"search.yaml:8: space.methods\[1\]: unknown merge method 'tiess' .*did you mean 'ties'\?"),
        ("[linear, ties]", "[linear, slerp]", r"search.yaml:8: space.methods\[1\]: merge method 'slerp' cannot merge 2 experts"),
        ("{groups: 3}", "per_layer", r"search.yaml:9: space.granularity: unknown granularity 'per_layer' .*did you mean 'per-layer'\?"),
        ("{groups: 3}", "{groups: 0}", r"search.yaml:9: space.granularity.groups: must be an integer >= 1, got 0"),
        ("[0.2, 1]", "[1, 0.2]", r"search.yaml:12: space.params.weight: a searched parameter is \[low, high\] with low < high"),
        (
            "    weight: [0.2, 1]",
            "    density: [0.5, 2]",
            r"search.yaml:12: space.params.density: the range \[0.5, 2\] leaves the values 'density' of merge method 'ties' can take",
        ),
        ("budget: 7", "budget: 0", r"search.yaml:15: budget: must be an integer >= 1, got 0"),
        ("time: 30m", "time: soon", r"search.yaml:16: time: must be a duration such as 90s, 30m or 2h"),
        ("  general: g", "  general: gen", r"search.yaml:6: evaluation.general: unknown general domain 'gen' \(valid: a, b, g\)$"),
        (
            "  experts: {a: ma, b: mb}",
            "  experts: {a: ma, c: mc}",
            r"search.yaml:3: models.experts.c: expert domain 'c' has no held-out text",
        ),
        ("g.txt}", "gone.txt}", r"search.yaml:5: evaluation.domains.g: held-out file .*gone.txt not found"),
        ("seed: 3", "seed: 3\noptimizer: cmaess", r"search.yaml:18: optimizer: unknown search optimizer 'cmaess' .*did you mean 'cmaes'\?"),
        ("seed: 3", "seed: 3\nobjective: worstt", r"search.yaml:18: objective: unknown objective 'worstt' .*did you mean 'worst'\?"),
        ("  general: g", "  general: g\n  search_share: 1", r"search.yaml:7: evaluation.search_share: must be between 0 and 1"),
        ("budget: 7", "budget: 7\nbudget: 8", r"search.yaml:16: key 'budget' is given twice"),
        (
            "seed: 3",
            "seed: 3\nfidelity: {screen_tokns: 9}",
            r"search.yaml:18: fidelity.screen_tokns: unknown key .*did you mean 'screen_tokens'\?",
        ),
        (
            "seed: 3",
            "seed: 3\nfidelity: {screen_tokens: 512, full_tokens: 256}",
            r"search.yaml:18: fidelity.screen_tokens: the screen \(512 tokens\) must be shorter than the full score \(256\)",
        ),
        ("seed: 3", "seed: 3\nfidelity: {keep: 0}", r"search.yaml:18: fidelity.keep: must be in \(0, 1\]"),
    ],
)
def test_bad_specs_are_one_line_errors_with_file_and_line(files, old, new, expected):
    assert old in GOOD
    with pytest.raises(SpliceError, match=expected) as e:
        load_spec(write(files, GOOD.replace(old, new)))
    assert "\n" not in str(e.value)


def test_a_required_parameter_needs_a_range(files):
    text = GOOD.replace("    weight: [0.2, 1]\n    lambda: [0.5, 1.5]\n    normalize: true\n", "").replace("[linear, ties]", "[nearswap]")
    text = text.replace("experts: {a: ma, b: mb}", "experts: {a: ma}")
    with pytest.raises(SpliceError, match=r"search.yaml:11: space.params: merge method 'nearswap' needs parameter 't': give its range"):
        load_spec(write(files, text))


def test_registry_ranges(files):
    s = load_spec(
        write(
            files,
            GOOD.replace("[linear, ties]", "[della]").replace("lambda: [0.5, 1.5]", "epsilon: range").replace("    normalize: true\n", ""),
        )
    )
    assert (s.space.params["epsilon"].low, s.space.params["epsilon"].high) == (0.0, 0.999)  # [0, 1): the open end moved in
    one = GOOD.replace("[linear, ties]", "[slerp]").replace("experts: {a: ma, b: mb}", "experts: {a: ma}")
    one = one.replace("    weight: [0.2, 1]\n    lambda: [0.5, 1.5]\n    normalize: true\n", "")
    t = load_spec(write(files, one)).space.params["t"]  # required, and bounded: searched over its whole range
    assert (t.low, t.high, t.searched) == (0.0, 1.0, True)
    with pytest.raises(SpliceError, match=r"search.yaml:13: space.params.lambda: 'lambda' has no bounded range in the registry"):
        load_spec(write(files, GOOD.replace("lambda: [0.5, 1.5]", "lambda: range")))


def test_missing_models_and_empty_specs(files):
    with pytest.raises(SpliceError, match=r"search.yaml:1: missing required key 'models'"):
        load_spec(write(files, "budget: 3\n"))
    with pytest.raises(SpliceError, match=r"search.yaml: the search spec is empty"):
        load_spec(write(files, "\n# nothing\n"))


def test_durations():
    assert parse_time("90s") == 90 and parse_time("30m") == 1800 and parse_time("1.5h") == 5400 and parse_time(12) == 12
    for bad in ("0s", "-3m", "an hour", True):
        with pytest.raises(SpliceError):
            parse_time(bad)
