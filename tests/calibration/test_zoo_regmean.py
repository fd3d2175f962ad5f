"""End to end on the session's tiny zoo: ``splice calibrate`` each expert, ``splice merge`` a regmean recipe,
both through the CLI; the output loads in transformers and its weights are RegMean's formula on the statistics."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import load_sd

from splice.calibration import open_statistics
from splice.cli import main

EXPERTS = ("code", "news")
ALPHA = 0.9


def formula(ws: list[torch.Tensor], base: torch.Tensor, grams: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """B + ((sum_i G_i')^-1 sum_i G_i' (W_i - B)^T)^T with G' = alpha G + (1 - alpha) diag(G), written out in float64."""
    a = sum(alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams)
    b = sum((alpha * g + (1 - alpha) * torch.diag(torch.diag(g))) @ (w - base).T for w, g in zip(ws, grams))
    return base + torch.linalg.solve(a, b).T


@pytest.fixture(scope="module")
def merged(tiny_zoo, tmp_path_factory):
    d, m = tiny_zoo
    root = tmp_path_factory.mktemp("zoo-regmean")
    stats = {}
    for e in EXPERTS:
        stats[e] = root / f"{e}.stats.safetensors"
        text = d / m["domains"][e]["train_file"]
        args = ["calibrate", str(d / "models" / e), "--text", str(text), "--tokens", "384", "--seq-len", "64", "-o", str(stats[e]), "-q"]
        assert main(args) == 0
    recipe = {
        "merge_method": "regmean",
        "base_model": str(d / "models" / "base"),
        "models": [{"model": str(d / "models" / e)} for e in EXPERTS],
        "parameters": {"alpha": ALPHA},
        "calibration": {str(d / "models" / e): str(stats[e]) for e in EXPERTS},
        "dtype": "float32",
    }
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(root / "r.yaml"), "-o", str(root / "out"), "-q"]) == 0
    return d, root / "out", stats


def test_output_loads_in_transformers_and_is_the_formula_on_the_statistics(merged):
    import transformers

    d, out, stats = merged
    lm = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = lm(torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(logits).all()
    got = load_sd(out)
    sds = {e: load_sd(d / "models" / e) for e in EXPERTS}
    base = load_sd(d / "models" / "base")
    sts = [open_statistics(stats[e]) for e in EXPERTS]
    assert all(st.tokens == 384 for st in sts)
    # the tiny experts tune the upper-half MLPs only: there RegMean is not the average; below, all equal the base
    tuned = ("model.layers.2.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.down_proj.weight")
    for name in ("model.layers.0.self_attn.q_proj.weight", *tuned):
        grams = [st.load(st.key_for(name)) for st in sts]  # per token, as the merge reads them
        expect = formula([sds[e][name].double() for e in EXPERTS], base[name].double(), grams, ALPHA)
        torch.testing.assert_close(got[name].double(), expect, rtol=1e-4, atol=1e-5)
        differs = not torch.allclose(got[name], (sds["code"][name] + sds["news"][name]) / 2, atol=1e-4)
        assert differs == (name in tuned), name
    emb = "model.embed_tokens.weight"  # rows weighted by how often each expert saw each token; unseen rows: the average
    counts = [st.load(st.key_for(emb)) for st in sts]
    den = counts[0] + counts[1]
    rows = (sds["code"][emb].double() * counts[0][:, None] + sds["news"][emb].double() * counts[1][:, None]) / den.clamp_min(1e-300)[
        :, None
    ]
    avg = (sds["code"][emb].double() + sds["news"][emb].double()) / 2
    torch.testing.assert_close(got[emb].double(), torch.where((den > 0)[:, None], rows, avg), rtol=1e-5, atol=1e-6)
    assert (den == 0).any() and (den > 0).any()
    norm = "model.layers.2.post_attention_layernorm.weight"  # no statistics: the linear fallback
    torch.testing.assert_close(got[norm], (sds["code"][norm] + sds["news"][norm]) / 2)
