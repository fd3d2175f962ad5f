"""Tiny random checkpoints built inside the tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")


def tiny_config(
    family: str = "llama",
    layers: int = 4,
    vocab: int = 96,
    hidden: int = 32,
    *,
    intermediate: int | None = None,
    tie: bool = False,
    positions: int = 64,
    rope_theta: float | None = None,
):
    """A small transformers config (4 heads, 2 KV heads); ``rope_theta`` set explicitly where a test checks that the
    rope base survives a round trip."""
    import transformers as tf

    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=hidden, n_layer=layers, n_head=4)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[family]
    cfg = cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        tie_word_embeddings=tie,
    )
    if rope_theta is not None:
        cfg.rope_parameters = {"rope_theta": rope_theta, "rope_type": "default"}
    return cfg


def write_tokenizer(folder: Path, vocab: int, extra: list[str] = ()) -> None:
    """A word-level tokenizer with ``vocab`` tokens t0..t{vocab-1} (plus ``extra`` added tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - len(extra))}
    words.update({w: len(words) + k for k, w in enumerate(extra)})
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", bos_token="t2")
    fast.save_pretrained(folder)


def make_model(
    folder: Path,
    family: str = "llama",
    *,
    seed: int = 0,
    layers: int = 4,
    vocab: int = 96,
    hidden: int = 32,
    dtype=torch.float32,
    from_model: Path | None = None,
    noise: float = 0.02,
    tokenizer: bool = True,
    extra_tokens: list[str] = (),
) -> Path:
    """Save a tiny random model; with ``from_model``, a 'fine-tune' of it (weights + seeded noise)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(family, layers, vocab, hidden)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    if from_model is not None:
        base = tf.AutoModelForCausalLM.from_pretrained(from_model, dtype=torch.float32)
        sd = base.state_dict()
        g = torch.Generator().manual_seed(seed)
        new = {}
        for k, v in sd.items():
            new[k] = v + noise * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        model.load_state_dict(new, strict=False)
    model = model.to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer:
        write_tokenizer(folder, vocab, list(extra_tokens))
    return folder


def load_sd(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def logits(folder: Path, ids=(1, 5, 7, 9)) -> torch.Tensor:
    import transformers as tf

    m = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    m.eval()
    with torch.no_grad():
        return m(torch.tensor([list(ids)])).logits


def random_statistics(model: Path, path: Path, seed: int = 0) -> Path:
    """A calibration statistics file for ``model`` (its fingerprint) with random positive definite Grams
    for every Linear weight, random token counts for the embedding and a random Fisher for every float
    tensor: for data-aware methods without text."""
    from splice.calibration import model_fingerprint, save_statistics
    from splice.checkpoint.reader import open_model

    g = torch.Generator().manual_seed(seed)
    src = open_model(model)
    try:
        linears = [k for k in src.keys() if k.endswith("proj.weight") or k == "lm_head.weight"]
        grams = {}
        for k in linears:
            x = torch.randn(2 * src.info(k).shape[1], src.info(k).shape[1], generator=g, dtype=torch.float64)
            grams[f"gram.{k}"] = x.T @ x
        rows = src.info("model.embed_tokens.weight").shape[0]
        counts = {"model.embed_tokens.weight": torch.randint(0, 5, (rows,), generator=g).to(torch.float64)}
        fisher = {k: torch.rand(src.info(k).shape, generator=g) for k in src.keys() if src.info(k).dtype.is_floating_point}
        fingerprint = model_fingerprint(src)
    finally:
        src.close()
    inputs = {k: f"gram.{k}" for k in linears}
    return save_statistics(path, grams, inputs, counts, {"tokens": "100", "model": str(model), "model_fingerprint": fingerprint}, fisher)


def word_docs(n: int, seed: int, lo: int = 30, hi: int = 96, per_doc: int = 30) -> str:
    """``n`` documents (blank-line separated) of ``per_doc`` random tokens t{lo}..t{hi-1}: calibration text for
    the word-level tokenizer of ``make_model``."""
    import random

    rng = random.Random(seed)
    return "\n\n".join(" ".join(f"t{rng.randrange(lo, hi)}" for _ in range(per_doc)) for _ in range(n))
