"""RegMean++ (``sequential: true``): every layer is RegMean's formula on Grams of each model's own layer run on
the *merged* model's hidden states, checked against the written output itself (a fixed point: the merged
model's hidden states after layer l-1, each model's layer l on them, the float64 formula)."""

from __future__ import annotations

import pytest
import torch
from helpers import load_sd, make_model, word_docs

import splice
from splice.calibration import read_documents, sample_windows
from splice.errors import RecipeError

ALPHA = 0.9
TOKENS, SEQ = 240, 24


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("regmeanpp")
    base = make_model(root / "base", "llama", seed=0, layers=2)
    fts = [make_model(root / f"ft{i}", "llama", seed=30 + i, layers=2, from_model=base, noise=0.08) for i in range(2)]
    texts = []
    for i, (lo, hi) in enumerate(((30, 75), (50, 96))):  # overlapping: the merged embedding rows differ from each model's
        texts.append(root / f"text{i}.txt")
        texts[-1].write_text(word_docs(16, i, lo, hi))
    return root, base, fts, texts


def recipe(fts, texts, **params) -> dict:
    return {
        "merge_method": "regmean",
        "models": [{"model": str(m)} for m in fts],
        "parameters": {"alpha": ALPHA, **params},
        "calibration": {str(m): {"text": str(t), "tokens": TOKENS, "seq_len": SEQ} for m, t in zip(fts, texts)},
        "dtype": "float32",
    }


def formula(ws, grams, alpha):
    a = sum(alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams)
    b = sum((alpha * g + (1 - alpha) * torch.diag(torch.diag(g))) @ w.T for w, g in zip(ws, grams))
    return torch.linalg.solve(a, b).T


def test_each_layer_is_the_formula_on_the_merged_models_hidden_states(trio, tmp_path):
    import transformers

    root, base, fts, texts = trio
    splice.merge(recipe(fts, texts, sequential=True), tmp_path / "pp", quiet=True)
    splice.merge(recipe(fts, texts), tmp_path / "plain", quiet=True)
    out, plain = load_sd(tmp_path / "pp"), load_sd(tmp_path / "plain")
    sds = [load_sd(f) for f in fts]
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pp").double().eval()
    experts = [transformers.AutoModelForCausalLM.from_pretrained(f).double().eval() for f in fts]
    tok = transformers.AutoTokenizer.from_pretrained(fts[0])
    wins = [sample_windows(tok, read_documents(t), tokens=TOKENS, seq_len=SEQ, seed=0, bos=None, source="t") for t in texts]
    torch.testing.assert_close(out["model.embed_tokens.weight"], plain["model.embed_tokens.weight"])  # token counts: as plain
    for layer in range(2):
        grams = {"qkv": [], "down": []}
        for lm, ws in zip(experts, wins):
            g_qkv = torch.zeros(32, 32, dtype=torch.float64)
            g_down = None
            for w in ws:
                with torch.no_grad():
                    h = merged(torch.tensor([w]), output_hidden_states=True).hidden_states[layer]  # merged layers 0..l-1
                    ly = lm.model.layers[layer]
                    x = ly.input_layernorm(h)[0]
                    g_qkv += x.T @ x
                    acts = {}
                    hd = ly.mlp.down_proj.register_forward_pre_hook(lambda m, a: acts.setdefault("x", a[0][0]))
                    pos = torch.arange(len(w))[None]
                    ly(h, position_embeddings=lm.model.rotary_emb(h, pos), position_ids=pos, attention_mask=None)
                    hd.remove()
                    g = acts["x"].T @ acts["x"]
                    g_down = g if g_down is None else g_down + g
            grams["qkv"].append(g_qkv / TOKENS)
            grams["down"].append(g_down / TOKENS)
        for leaf, key in (("self_attn.q_proj", "qkv"), ("self_attn.v_proj", "qkv"), ("mlp.down_proj", "down")):
            name = f"model.layers.{layer}.{leaf}.weight"
            expect = formula([sd[name].double() for sd in sds], grams[key], ALPHA)
            torch.testing.assert_close(out[name].double(), expect, rtol=1e-4, atol=1e-5)
    # the untied head: each model's own final norm on the merged model's last hidden states
    heads = []
    for lm, ws in zip(experts, wins):
        g = torch.zeros(32, 32, dtype=torch.float64)
        for w in ws:
            last = {}
            hd = merged.model.layers[-1].register_forward_hook(lambda m, a, o: last.setdefault("h", o[0] if isinstance(o, tuple) else o))
            with torch.no_grad():
                merged(torch.tensor([w]))
                x = lm.model.norm(last["h"])[0]
            hd.remove()
            g += x.T @ x
        heads.append(g / TOKENS)
    expect = formula([sd["lm_head.weight"].double() for sd in sds], heads, ALPHA)
    torch.testing.assert_close(out["lm_head.weight"].double(), expect, rtol=1e-4, atol=1e-5)
    # layer 0's inputs are the merged embeddings, not each model's own: RegMean++ differs from RegMean from the start
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(out[name], plain[name], atol=1e-5)


def test_same_embeddings_give_plain_regmean_in_the_first_layer(trio, tmp_path):
    """Models whose embeddings agree feed layer 0 the same hidden states either way: layer 0 is plain RegMean's."""
    root, base, fts, texts = trio
    same = []
    emb = load_sd(base)["model.embed_tokens.weight"]
    for i, f in enumerate(fts):
        sd = load_sd(f)
        sd["model.embed_tokens.weight"] = emb.clone()
        d = root / f"same{i}"
        d.mkdir(exist_ok=True)
        for p in f.iterdir():
            if p.suffix != ".safetensors":
                (d / p.name).write_bytes(p.read_bytes())
        from safetensors.torch import save_file

        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        same.append(d)
    splice.merge(recipe(same, texts, sequential=True), tmp_path / "pp", quiet=True)
    splice.merge(recipe(same, texts), tmp_path / "plain", quiet=True)
    a, b = load_sd(tmp_path / "pp"), load_sd(tmp_path / "plain")
    for k in a:
        if k.startswith("model.layers.0."):
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a["model.layers.1.self_attn.q_proj.weight"], b["model.layers.1.self_attn.q_proj.weight"], atol=1e-5)


def test_sequential_refuses_slices_and_a_missing_text(trio, tmp_path):
    root, base, fts, texts = trio
    r = recipe(fts, texts, sequential=True)
    r["slices"] = [{"sources": [{"model": str(m), "layer_range": [0, 2]} for m in fts]}]
    del r["models"]
    with pytest.raises(RecipeError, match="does not take slices"):
        splice.merge(r, tmp_path / "out", quiet=True)
    gone = root / "gone.txt"
    gone.write_text(texts[0].read_text())
    stats = tmp_path / "s.safetensors"
    splice.calibrate(fts[0], gone, stats, tokens=TOKENS, seq_len=SEQ, quiet=True)
    gone.unlink()
    r = recipe(fts, texts, sequential=True)
    r["calibration"][str(fts[0])] = str(stats)
    with pytest.raises(RecipeError, match="gone.txt.* is not there"):
        splice.merge(r, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
