"""Real mergekit recipes, run unchanged on tiny stand-ins, by splice and by mergekit 0.1.5.

``tests/recipes/`` holds published recipes verbatim (mergekit's examples and docs,
configs from public repositories and model cards), each with its source on the
first line. Every model a recipe names is replaced by a tiny random model of the
same architecture and layer count (``STAND_INS``; fine-tunes of one root per
architecture, so task vectors are small and real), then:

- merge recipes run with ``splice.merge`` and, in the same session's mergekit
  side process, as ``mergekit-yaml`` would run them; deterministic methods must
  agree on every tensor to 1e-4. Under ``dtype: bfloat16`` / ``float16`` mergekit
  computes in that dtype and splice in float32 (a deliberate difference: up to a
  couple of bf16 rounding steps on up to a quarter of the elements), so such a recipe runs with
  splice as published and is compared with ``dtype: float32``, where both compute
  alike. TIES-style trimming may differ where magnitudes tie at the threshold
  (counted, at most ``MAX_TIE_FRACTION`` of a recipe's elements); random methods
  (DARE, DELLA) only have to run;
- MoE recipes run with ``splice moe``; mergekit-moe's own acceptance checks must
  agree on whether they build (their gates differ by design, see the README).

Run ``pytest tests/test_recipe_corpus.py -s`` for the per-recipe table and totals.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_sd, make_model
from mergekit_side import MergekitError

import splice
from splice.errors import SpliceError

RECIPES = Path(__file__).parent / "recipes"
FILES = sorted(p.name for p in RECIPES.glob("*.yml"))

# Hub id (or the author's local path) -> (architecture, layers) of the model it names.
_LLAMA2_13B = ("llama", 40)
_LLAMA3_8B = ("llama", 32)
_MISTRAL_7B = ("mistral", 32)
_ABSA_FT = "D:/Uni/Masterarbeit Code/jakob_finetuning/finetuned_models/meta_llama_full_colab_remerge_2"
_ABSA_DE = "D:/Huggingface/hub/models--VAGOsolutions--Llama-3.1-SauerkrautLM-8b-Instruct/snapshots/221e5f92f9dc5fedaf4556b1be6b20642638643c"
STAND_INS = {
    **dict.fromkeys(
        [
            "psmathur/orca_mini_v3_13b",
            "garage-bAInd/Platypus2-13B",
            "WizardLM/WizardLM-13B-V1.2",
            "WizardLM/WizardMath-13B-V1.0",
            "TheBloke/Llama-2-13B-fp16",
        ],
        _LLAMA2_13B,
    ),
    **dict.fromkeys(
        [
            _ABSA_FT,
            _ABSA_DE,
            "unsloth/Meta-Llama-3.1-8B-Instruct",
            "Nos-PT/Llama-Carvalho-PT-GL",
            "arcee-ai/Llama-3.1-SuperNova-Lite",
            "DreadPoor/Heart_Stolen-8B-Model_Stock",
            "Dampfinchen/Llama-3.1-8B-Ultra-Instruct",
            "model_a",
            "model_b",
        ],
        _LLAMA3_8B,
    ),
    **dict.fromkeys(["01-ai/Yi-1.5-6B-Chat", "01-ai/Yi-1.5-6B"], ("llama", 32)),  # Yi is Llama-shaped
    **dict.fromkeys(
        [
            "mistralai/Mistral-7B-v0.1",
            "mistralai/Mistral-7B-Instruct-v0.2",
            "BioMistral/BioMistral-7B",
            "BioMistral/BioMistral-7B-DARE",
            "OpenPipe/mistral-ft-optimized-1218",
            "mlabonne/NeuralHermes-2.5-Mistral-7B",
            "samir-fama/SamirGPT-v1",
            "abacusai/Slerp-CM-mist-dpo",
            "EmbeddedLLM/Mistral-7B-Merge-14-v0.2",
            "MiniMoog/Mergerix-7b-v0.3",
            "automerger/Ognoexperiment27Multi_verse_model-7B",
            "AurelPx/Percival_01-7b-slerp",
            "automerger/YamshadowExperiment28-7B",
            "NousResearch/Hermes-2-Pro-Mistral-7B",
            "teknium/OpenHermes-2.5-Mistral-7B",
            "PocketDoc/Dans-AdventurousWinds-7b",
            "VAGOsolutions/SauerkrautLM-7b-HerO",
        ],
        _MISTRAL_7B,
    ),
    **dict.fromkeys(["huihui-ai/Qwen2.5-Coder-7B-Instruct-abliterated", "netcat420/qwen2.5-MFANN-7b-v1.1"], ("qwen2", 28)),
    "gpt2": ("gpt2", 12),
    "BEE-spoke-data/smol_llama-220M-GQA": ("llama", 10),
    **dict.fromkeys(
        [
            "DopeorNope/SOLARC-M-10.7B",
            "maywell/PiVoT-10.7B-Mistral-v0.2-RP",
            "kyujinpy/Sakura-SOLAR-Instruct",
            "jeonsworld/CarbonVillain-en-10.7B-v1",
        ],
        ("llama", 48),  # SOLAR 10.7B: depth-up-scaled Llama/Mistral, 48 layers
    ),
}
HIDDEN = 16  # tiny: a 48-layer stand-in is a few hundred kilobytes

RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
# trimming by magnitude: where magnitudes tie at the threshold the two may keep different elements
THRESHOLD_METHODS = {"ties", "breadcrumbs", "breadcrumbs_ties", "sce"}
MAX_TIE_FRACTION = 0.02  # sce on bf16 stand-ins: 1.2% (variances of bf16 deltas tie often)

# Recipes both tools refuse, and the words of splice's one-line reason.
REFUSED = {
    "moe-hf-lumosia-moe-4x10.7.yml": "the router could not tell the experts apart",
}

# Recipes mergekit 0.1.5 refuses but splice builds, and the words of mergekit's error.
MERGEKIT_REFUSES = {
    # one slice that averages four layer ranges of one model: 0.1.5 sees the same input four times
    "hf-hx-mistral-1.5b-v0.1-linear-slices.yml": "Duplicate merge inputs",
}

RESULTS: dict[str, str] = {}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Name -> folder of its tiny stand-in, made on first use (one root per architecture and depth)."""
    root = tmp_path_factory.mktemp("stand-ins")
    made: dict = {}

    def get(name: str) -> Path:
        if name not in made:
            family, layers = STAND_INS[name]
            key = (family, layers)
            if key not in made:
                made[key] = make_model(root / f"root-{family}-{layers}", family, seed=1, layers=layers, hidden=HIDDEN)
            made[name] = _fine_tune(made[key], root / f"m{zlib.crc32(name.encode())}", seed=zlib.crc32(name.encode()))
        return made[name]

    return get


def _fine_tune(base: Path, out: Path, *, seed: int, noise: float = 0.01) -> Path:
    """A copy of ``base`` with seeded noise on every weight (written directly, no transformers model built)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors"))
    g = torch.Generator().manual_seed(seed)
    sd = {k: (v + noise * torch.randn(v.shape, generator=g)).contiguous() for k, v in load_file(base / "model.safetensors").items()}
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _documents(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _substitute(node, get, stages: set):
    """Every model name in a recipe replaced by its stand-in's folder (stage names of a multi-stage recipe kept)."""
    if isinstance(node, list):
        return [_substitute(v, get, stages) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in ("model", "base_model", "source_model", "tokenizer_source") and isinstance(v, str) and v not in stages:
            out[k] = v if v in ("base", "union") else str(get(v))
        elif k == "tokenizer" and isinstance(v, dict) and isinstance(v.get("source"), str) and v["source"] not in ("base", "union"):
            out[k] = {**v, "source": str(get(v["source"]))}
        else:
            out[k] = _substitute(v, get, stages)
    return out


def _localised(path: Path, get, tmp_path: Path) -> tuple[Path, list]:
    docs = _documents(path)
    stages = {d["name"] for d in docs if isinstance(d, dict) and "name" in d}
    docs = [_substitute(d, get, stages) for d in docs]
    p = tmp_path / path.name
    p.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    return p, docs


def _compare(ours: dict, theirs: dict, method: str) -> tuple[int, int]:
    """(elements that differ at a threshold tie, elements compared); any other difference beyond 1e-4 fails."""
    assert set(ours) == set(theirs), f"tensor names differ: {sorted(set(ours) ^ set(theirs))[:6]}"
    ties = total = 0
    for k in sorted(theirs):
        a, b = ours[k], theirs[k]
        assert a.dtype == b.dtype and a.shape == b.shape, f"{k}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        diff = (a.double() - b.double()).abs()
        bad = int((diff > 1e-4 + 1e-4 * b.double().abs()).sum())
        total += b.numel()
        if bad:
            assert method in THRESHOLD_METHODS, f"{k}: {bad} of {b.numel()} elements differ (max {float(diff.max()):.3g})"
            ties += bad
    return ties, total


def _in_float32(docs: list, tmp_path: Path) -> Path:
    """The recipe with float32 arithmetic and output, for comparison (mergekit computes in the recipe's dtype)."""
    docs = [{**d, "dtype": "float32", **({"out_dtype": "float32"} if "out_dtype" in d else {})} for d in docs]
    p = tmp_path / "float32.yaml"
    p.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    return p


@pytest.mark.parametrize("name", FILES)
def test_recipe(tmp_path, stand_ins, mergekit, name):
    path, docs = _localised(RECIPES / name, stand_ins, tmp_path)
    ours = tmp_path / "ours"
    if "merge_method" not in docs[-1]:  # a mergekit-moe recipe
        from splice.moe import build_moe

        accepted = mergekit.moe_accepts(path)
        if name in REFUSED:
            with pytest.raises(SpliceError, match=REFUSED[name]):
                build_moe(path, ours, quiet=True)
            assert not accepted, "mergekit-moe builds a recipe splice refuses"
            RESULTS[name] = "moe: refused by both"
            return
        build_moe(path, ours, quiet=True)
        assert accepted, "splice builds an MoE recipe mergekit-moe refuses"
        RESULTS[name] = "moe: built by both"
        return
    method = docs[-1]["merge_method"]
    splice.merge(path, ours, quiet=True)
    assert load_sd(ours), "no weights written"
    if method in RANDOM_METHODS or len(docs) > 1:
        RESULTS[name] = f"{method}: runs (random, not compared)"
        return
    if name in MERGEKIT_REFUSES:
        with pytest.raises(MergekitError, match=MERGEKIT_REFUSES[name]):
            mergekit.run_yaml(path, tmp_path / "theirs")
        RESULTS[name] = f"{method}: splice builds, mergekit 0.1.5 refuses"
        return
    note = ""
    if docs[-1].get("dtype") in ("bfloat16", "float16"):
        note = f", compared in float32 (published: {docs[-1]['dtype']})"
        path, ours = _in_float32(docs, tmp_path), tmp_path / "ours-float32"
        splice.merge(path, ours, quiet=True)
    mergekit.run_yaml(path, tmp_path / "theirs")
    ties, total = _compare(load_sd(ours), load_sd(tmp_path / "theirs"), method)
    assert ties <= MAX_TIE_FRACTION * total, f"{ties} of {total} elements differ, more than threshold ties explain"
    RESULTS[name] = f"{method}: agrees{note}" + (f"; {ties} of {total} elements at threshold ties" if ties else "")


def test_corpus_size_and_summary():
    """At least 30 recipes; prints the table (pytest -s) after the per-recipe tests have run."""
    assert len(FILES) >= 30
    if RESULTS:
        for f in FILES:
            print(f"{f:48} {RESULTS.get(f, 'not run')}")
        agree = sum("agrees" in r for r in RESULTS.values())
        print(f"{len(RESULTS)} of {len(FILES)} recipes ran; {agree} compared tensor by tensor agree")
