"""mergekit-moe recipes: what mergekit-moe 0.1.5 accepts builds under splice moe, or fails with one line saying why
mergekit's output would be meaningless there.

Each case is the shape of a published mergekit-moe recipe (empty prompts as in Helion-4x34B and phixtral,
sparse upcycling and the clown car from mergekit's docs/moe.md), on tiny donors. ``test_mergekit_agrees``
asks mergekit 0.1.5 itself (its schema and ``is_bad_config``, in the side venv) whether it accepts each one.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import load_sd
from moe_helpers import PROMPTS, recipe

from splice.errors import SpliceError
from splice.moe import build_moe, load_moe_recipe


def _empty_with_negatives(base, experts):  # Helion-4x34B: an expert for "anything but math"
    r = recipe(base, experts)
    r["experts"][2]["positive_prompts"] = [""]
    r["experts"][2]["negative_prompts"] = PROMPTS[0]
    return r


def _empty_default(mode):
    def make(base, experts):
        r = recipe(base, experts, gate_mode=mode)
        r["experts"][2]["positive_prompts"] = [""]
        return r

    return make


def _all_empty(mode, same_model=False):  # phixtral (cheap_embed), Sonya/Lumosia-MoE (hidden)
    def make(base, experts):
        r = recipe(base, [experts[0]] * 3 if same_model else experts, gate_mode=mode)
        for e in r["experts"]:
            e["positive_prompts"] = [""]
        return r

    return make


def _pair_identical(base, experts):
    r = recipe(base, experts)
    r["experts"][1]["positive_prompts"] = r["experts"][0]["positive_prompts"]
    return r


def _upcycling(base, experts):  # docs/moe.md: sparse upcycling, the same model as every expert, random gates
    return {"base_model": str(base), "gate_mode": "random", "dtype": "bfloat16", "experts": [{"source_model": str(base)}] * 4}


def _clown_car(base, experts):  # docs/moe.md: prompts with chat markup and newlines
    r = {"base_model": str(base), "gate_mode": "hidden", "dtype": "bfloat16", "experts": []}
    prompts = [
        ["<|im_start|>user\nHello, who are you?<|im_end|>", "<|im_start|>user\nI need help with"],
        ["As a doctor of medicine,"],
        ["[Genres: Science Fiction]\n[Tags: humor, old school, sci fi]", "> get ye flask", "[Mode: Interactive Storyteller]"],
        ["<|im_start|>user\nWie geht es dir?<|im_end|>", "Das ist ein Satz auf Deutsch."],
    ]
    for i, p in enumerate(prompts):
        r["experts"].append(
            {"source_model": str(experts[i % 3] if i < 3 else base), "positive_prompts": [f"{w} t{30 + 20 * i}" for w in p]}
        )
    return r


def _with(**kw):
    def make(base, experts):
        r = recipe(base, experts)
        r.update(kw)
        return r

    return make


def _uniform_random_no_prompts(base, experts):
    r = recipe(base, experts, gate_mode="uniform_random")
    for e in r["experts"]:
        del e["positive_prompts"]
    return r


# name: (recipe, what splice does: None = builds, else words of its one-line error, does mergekit-moe 0.1.5 accept it)
CASES = {
    "empty prompt with negative prompts (hidden)": (_empty_with_negatives, None, True),
    "empty prompt as a default expert (cheap_embed)": (_empty_default("cheap_embed"), None, True),
    "empty prompt as a default expert (hidden)": (_empty_default("hidden"), None, True),
    "all prompts empty (cheap_embed)": (_all_empty("cheap_embed"), ["all 3 experts have the same prompts ['']", "refuses this too"], False),
    "all prompts empty, one model (hidden)": (
        _all_empty("hidden", same_model=True),
        ["the router could not tell the experts apart"],
        False,
    ),
    "two experts with the same prompts": (_pair_identical, ["experts[0] and experts[1]", "one averaged expert"], True),
    "sparse upcycling (docs/moe.md)": (_upcycling, None, True),
    "clown car (docs/moe.md)": (_clown_car, None, True),
    "gate_mode hidden_avg": (_with(gate_mode="hidden_avg"), None, True),
    "gate_mode hidden_last": (_with(gate_mode="hidden_last"), None, True),
    "architecture by prefix": (_with(architecture="Mix"), None, True),
    "experts_per_token 2.0": (_with(experts_per_token=2.0), None, True),
    # splice is more permissive here: uniform_random gates need no prompts
    "uniform_random without prompts": (_uniform_random_no_prompts, None, False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_splice_builds_or_says_why(tmp_path, moe_donors, name):
    make, error, _ = CASES[name]
    base, experts = moe_donors
    r = make(base, experts)
    out = tmp_path / "moe"
    if error is None:
        s = build_moe(r, out, quiet=True)
        gate = load_sd(out)["model.layers.0.block_sparse_moe.gate.weight"]
        assert gate.shape == (len(r["experts"]), 64) and torch.isfinite(gate.float()).all()
        assert s["experts"] == len(r["experts"])
    else:
        with pytest.raises(SpliceError) as e:
            build_moe(r, out, quiet=True)
        msg = str(e.value)
        assert "\n" not in msg and not out.exists()
        for words in error:
            assert words in msg, msg


@pytest.mark.mergekit
@pytest.mark.parametrize("name", sorted(CASES))
def test_mergekit_agrees(tmp_path, moe_donors, mergekit, name):
    make, _, accepted = CASES[name]
    base, experts = moe_donors
    p = tmp_path / "moe.yaml"
    p.write_text(yaml.safe_dump(make(base, experts), sort_keys=False))
    assert mergekit.moe_accepts(p) is accepted


def _encode(tok, text):
    return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]


def test_cheap_embed_empty_prompt_is_the_bos_embedding(tmp_path, moe_donors):
    """As in mergekit, "" is just the BOS token; the vectors are then centred over experts and scaled to unit length."""
    from transformers import AutoTokenizer

    base, experts = moe_donors
    r = _empty_default("cheap_embed")(base, experts)
    build_moe(r, tmp_path / "moe", quiet=True)
    tok = AutoTokenizer.from_pretrained(base)
    embed = load_sd(base)["model.embed_tokens.weight"].double()
    vecs = torch.stack([embed[[t for p in e["positive_prompts"] for t in _encode(tok, p)]].mean(0) for e in r["experts"]])
    assert torch.equal(vecs[2], embed[tok.bos_token_id])
    vecs = vecs - vecs.mean(0)
    expected = vecs / vecs.norm(dim=-1, keepdim=True)
    got = load_sd(tmp_path / "moe")["model.layers.1.block_sparse_moe.gate.weight"].double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_hidden_empty_prompt_expert_is_the_complement_of_the_others(tmp_path, moe_donors):
    """Under hidden an empty prompt adds no feature (the BOS token never is one): that expert starts at zero, so after
    centring its gate points away from the other experts' mean."""
    base, experts = moe_donors
    build_moe(_empty_default("hidden")(base, experts), tmp_path / "moe", quiet=True)
    g = load_sd(tmp_path / "moe")["model.layers.0.block_sparse_moe.gate.weight"].double()
    assert torch.cosine_similarity(g[2], -(g[0] + g[1]), dim=0) > 0.99


def test_hidden_avg_is_hidden_and_hidden_last_differs(tmp_path, moe_donors):
    base, experts = moe_donors
    gates = {}
    for mode in ("hidden", "hidden_avg", "hidden_last"):
        build_moe(recipe(base, experts, gate_mode=mode), tmp_path / mode, quiet=True)
        gates[mode] = load_sd(tmp_path / mode)["model.layers.1.block_sparse_moe.gate.weight"]
    assert torch.equal(gates["hidden"], gates["hidden_avg"])
    assert not torch.allclose(gates["hidden"], gates["hidden_last"])


@pytest.mark.parametrize(
    ("given", "family"), [("Mixtral", "mixtral"), ("mix", "mixtral"), ("Qwen3", "qwen3_moe"), ("qwen3 m", "qwen3_moe")]
)
def test_architecture_prefixes_as_mergekit(moe_donors, given, family):
    base, experts = moe_donors
    assert load_moe_recipe(recipe(base, experts, architecture=given)).architecture == family


def test_unsupported_architecture_still_says_so(moe_donors):
    base, experts = moe_donors
    with pytest.raises(SpliceError, match="unsupported output architecture 'DeepSeek'"):
        load_moe_recipe(recipe(base, experts, architecture="DeepSeek"))
