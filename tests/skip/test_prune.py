"""Pruned checkpoints load in plain transformers and compute what the original computes with those units bypassed."""

import json

import pytest
import torch
import transformers as tf

from splice.architecture import decoder_layers
from splice.hf import load_causal_lm
from splice.skip import plan, prune, skipping

IDS = torch.tensor([[2, 5, 7, 9, 11, 40, 3, 8]])


def _orig_logits(folder, units):
    m = load_causal_lm(folder)
    with torch.no_grad(), skipping(m, units):
        return m(IDS, use_cache=False).logits


def _plain_logits(folder):
    m = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(IDS).logits, m


@pytest.mark.parametrize("strategy,kw", [("balanced", {"drop": 2}), ("block-influence", {"drop": 3}), ("angular", {"ratio": 0.34})])
def test_layer_drops_load_and_match_bypassed_original(skip_models, tmp_path, strategy, kw):
    models, cal = skip_models
    src = models["qwen2"]
    p = plan(str(src), strategy, calibration=str(cal), calibration_tokens=512, **kw)
    out = tmp_path / "pruned"
    prune(p, out)
    cfg = json.loads((out / "config.json").read_text())
    kept = 6 - len(p.drop_layers)
    assert cfg["num_hidden_layers"] == kept and len(cfg["layer_types"]) == kept
    got, m = _plain_logits(out)
    assert len(decoder_layers(m)) == kept
    torch.testing.assert_close(got, _orig_logits(src, p.units), rtol=1e-5, atol=1e-5)
    # layers are renumbered: the pruned layer i is the original kept_layers[i]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f, safe_open(str(src / "model.safetensors"), "pt") as g:
        for new, old in enumerate(p.kept_layers):
            n = "model.layers.{}.self_attn.q_proj.weight"
            torch.testing.assert_close(f.get_tensor(n.format(new)), g.get_tensor(n.format(old)))


def test_mlp_drops_are_zeroed_projections_transformers_loads(skip_models, tmp_path):
    models, cal = skip_models
    src = models["llama"]
    p = plan(str(src), "ffn", drop=2, calibration=str(cal), calibration_tokens=512)
    out = tmp_path / "ffn"
    prune(p, out)
    got, m = _plain_logits(out)
    assert m.config.num_hidden_layers == 6
    layers = decoder_layers(m)
    for i in range(6):
        zero = bool((layers[i].mlp.down_proj.weight == 0).all())
        assert zero == (i in p.drop_mlp)
    torch.testing.assert_close(got, _orig_logits(src, p.units), rtol=1e-5, atol=1e-5)
    fast = load_causal_lm(out, bypass_zero_mlps=True)  # splice's runtime skips the zeroed blocks' compute
    assert fast.splice_bypassed_mlps == p.drop_mlp
    with torch.no_grad():
        torch.testing.assert_close(fast(IDS).logits, got, rtol=1e-5, atol=1e-5)


def test_heal_trains_only_the_layers_next_to_the_cut(skip_models, tmp_path):
    models, cal = skip_models
    src = models["llama"]
    p = plan(str(src), "balanced", drop=1)  # drops layer 3 of 0..5 -> neighbours 2 and 4 (new 2 and 3)
    assert p.drop_layers == [3]
    out = tmp_path / "healed"
    r = prune(p, out, heal=3, calibration=str(cal), heal_lr=1e-2, seq_len=64, heal_batch=2)
    h = r["healed"]
    assert h["layers"] == [2, 3] and h["steps"] == 3
    assert h["loss_after"] < h["loss_before"]
    assert "Healing" in (out / "README.md").read_text()
    healed = tf.AutoModelForCausalLM.from_pretrained(out).state_dict()
    orig = tf.AutoModelForCausalLM.from_pretrained(src).state_dict()
    n = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(healed[n.format(0)], orig[n.format(0)]) and torch.equal(healed[n.format(4)], orig[n.format(5)])
    assert not torch.equal(healed[n.format(2)], orig[n.format(2)]) and not torch.equal(healed[n.format(3)], orig[n.format(4)])
    assert [p.name for p in tmp_path.iterdir()] == ["healed"]  # the intermediate folder is gone
