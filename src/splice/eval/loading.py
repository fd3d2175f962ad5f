"""Load any checkpoint splice can read into a transformers causal LM plus its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError


def load_model(ref: str | os.PathLike, *, dtype: str = "float32", tokenizer: str | os.PathLike | None = None):
    """Return ``(model, tokenizer)`` for a HF folder, a ``.gguf`` file, or anything ``open_model`` opens.

    Plain safetensors folders go through ``from_pretrained`` (no remote code, no
    pickle); other sources are rebuilt from their config and filled tensor by tensor.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..checkpoint.reader import FolderSource, open_model

    hf_logging.disable_progress_bar()
    torch_dtype = getattr(torch, dtype)
    src = open_model(ref)
    try:
        tok_dir = Path(tokenizer) if tokenizer else src.tokenizer_dir()
        if tok_dir is None:
            raise CheckpointError(f"model {ref}: no tokenizer files found (pass a tokenizer folder)")
        tok = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)
        if type(src) is FolderSource and (Path(src.path) / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(str(src.path), dtype=torch_dtype, trust_remote_code=False, use_safetensors=True)
        else:
            cfg = dict(src.config)
            model_type = cfg.pop("model_type", None)
            if not model_type:
                raise CheckpointError(f"model {ref}: config has no model_type")
            for k in ("torch_dtype", "dtype", "transformers_version"):
                cfg.pop(k, None)
            hf_cfg = AutoConfig.for_model(model_type, **cfg)
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch_dtype)
            sd = {k: src.get(k).to(torch_dtype) for k in src.keys()}
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if getattr(hf_cfg, "tie_word_embeddings", False):
                missing = [m for m in missing if m != "lm_head.weight"]
            if unexpected:
                raise CheckpointError(f"model {ref}: unexpected tensor {unexpected[0]!r} for {model_type}")
            if missing:
                raise CheckpointError(f"model {ref}: tensor {missing[0]!r} missing for {model_type}")
    finally:
        src.close()
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
