"""The one registry idiom: same lookup, same error, a suggestion for a near miss."""

import pytest

from splice.errors import SpliceError
from splice.registry import Registry, UnknownName, did_you_mean


def _reg():
    r = Registry("skip strategy")
    r.add("balanced", 1)
    r.add("block-influence", 2, aliases=("shortgpt",))
    return r


def test_lookup_by_name_and_alias():
    r = _reg()
    assert r.get("balanced") == 1 and r.get("shortgpt") == 2
    assert r.names() == ["balanced", "block-influence"] and "shortgpt" in r and len(r) == 2


def test_unknown_name_suggests_the_closest_and_lists_valid():
    with pytest.raises(
        UnknownName, match=r"unknown skip strategy 'balancd' \(valid: balanced, block-influence\); did you mean 'balanced'\?"
    ) as e:
        _reg().get("balancd")
    assert isinstance(e.value, SpliceError) and isinstance(e.value, KeyError) and e.value.suggestion == "balanced"


def test_far_name_has_no_suggestion():
    with pytest.raises(UnknownName, match=r"^unknown skip strategy 'xyzzy' \(valid: ") as e:
        _reg().get("xyzzy")
    assert e.value.suggestion is None


def test_duplicate_registration_is_refused():
    r = _reg()
    with pytest.raises(ValueError, match="registered twice"):
        r.add("shortgpt", 3)


def test_loader_runs_once_before_first_lookup():
    calls = []
    r = Registry("thing", loader=lambda: (calls.append(1), r.add("a", 1)))
    assert calls == []
    assert r.get("a") == 1 and r.names() == ["a"] and calls == [1]


def test_did_you_mean_is_case_insensitive():
    assert did_you_mean("TIES", ["ties", "linear"]) == "ties"
    assert did_you_mean(3, ["ties"]) is None
