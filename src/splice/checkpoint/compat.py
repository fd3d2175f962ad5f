"""``config.json`` and ``tokenizer_config.json`` in the form transformers 4.x and 5.x both read.

transformers 5 changed two things an output folder carries, and 4.x reads neither the new way:

- rotary settings moved from top-level ``rope_theta`` / ``rope_scaling`` into one
  ``rope_parameters`` dict (per layer type for models such as Gemma 3). 4.x ignores
  ``rope_parameters`` and silently falls back to its default base (10000), so a model with
  another base computes different logits. 5.x reads ``rope_parameters`` first (and folds an old
  ``rope_scaling`` into it), so writing both, with the same values, is safe.
- tokenizer classes got 5.x-only names (``TokenizersBackend``, ...) that 4.x's AutoTokenizer
  cannot find, and a list of ``extra_special_tokens`` that 4.x expects as a dict. With a
  ``tokenizer.json`` beside it, ``PreTrainedTokenizerFast`` reads the same tokenizer in both
  (5.x maps it to ``TokenizersBackend``), and the list is 4.x's ``additional_special_tokens``,
  which 5.x also reads.

Both functions keep everything 5.x needs and only add (or, for the two tokenizer keys
above, rename) what 4.x needs; a 4.x-style input comes back unchanged.
"""

from __future__ import annotations

import copy

# tokenizer classes only transformers 5 knows (its backend classes) -> the one 4.x reads from tokenizer.json
_TF5_ONLY_TOKENIZERS = ("TokenizersBackend", "PythonBackend", "SentencePieceBackend")
_FAST_TOKENIZER = "PreTrainedTokenizerFast"


def _legacy_rope(params: dict) -> tuple[float | None, dict | None]:
    """(rope_theta, rope_scaling) of one transformers-5 ``rope_parameters`` dict; scaling None for plain rotary."""
    theta = params.get("rope_theta")
    rest = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    kind = rest.get("rope_type", "default")
    if kind == "default":
        return theta, None
    return theta, rest


def config_for_both(config: dict) -> dict:
    """``config`` with top-level ``rope_theta`` / ``rope_scaling`` (and Gemma 3's ``rope_local_base_freq``)
    added beside a transformers-5 ``rope_parameters``, where they are missing. Returns a copy."""
    out = copy.deepcopy(config)
    for sub in out.values():  # composite configs (text_config, ...) carry their own rope settings
        if isinstance(sub, dict) and "rope_parameters" in sub:
            sub.update(config_for_both(sub))
    rp = out.get("rope_parameters")
    if not isinstance(rp, dict) or not rp:
        return out
    if all(isinstance(v, dict) for v in rp.values()):  # one dict per layer type
        full = rp.get("full_attention") or next(iter(rp.values()))
        theta, scaling = _legacy_rope(full)
        local = rp.get("sliding_attention")
        if isinstance(local, dict) and local.get("rope_theta") is not None and str(out.get("model_type", "")).startswith("gemma3"):
            out.setdefault("rope_local_base_freq", local["rope_theta"])
    else:
        theta, scaling = _legacy_rope(rp)
    if theta is not None:
        out.setdefault("rope_theta", theta)
    if "rope_scaling" not in out or out["rope_scaling"] is None:
        out["rope_scaling"] = scaling
    if out["rope_scaling"] is None:
        del out["rope_scaling"]
    prf = rp.get("partial_rotary_factor")
    if prf is not None:
        out.setdefault("partial_rotary_factor", prf)
    return out


def tokenizer_config_for_both(data: dict, has_tokenizer_json: bool) -> dict:
    """``tokenizer_config.json`` data with a 5.x-only class name replaced by ``PreTrainedTokenizerFast``
    (only when a ``tokenizer.json`` is there to read) and a list of ``extra_special_tokens`` written as
    ``additional_special_tokens``. Returns a copy."""
    out = dict(data)
    if has_tokenizer_json and out.get("tokenizer_class") in _TF5_ONLY_TOKENIZERS:
        out["tokenizer_class"] = _FAST_TOKENIZER
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        del out["extra_special_tokens"]
        if extra:
            have = list(out.get("additional_special_tokens") or [])
            out["additional_special_tokens"] = have + [t for t in extra if t not in have]
    return out
