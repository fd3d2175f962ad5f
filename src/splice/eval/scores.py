"""MergeBench-style normalized scores and forgetting.

For a composed model M, its base B and the expert E_d tuned on domain d::

    normalized_d = (loss_B,d - loss_M,d) / (loss_B,d - loss_E_d,d)

the share of the expert's improvement over the base that M keeps on d (1 = as
good as the expert, 0 = no better than the base, < 0 = worse than the base).
``normalized`` is the mean over the expert domains. Forgetting is M's loss change
on a general domain no expert was tuned on, relative to the base (positive =
worse): ``(loss_M,g - loss_B,g) / loss_B,g``.
"""

from __future__ import annotations


def normalized_scores(
    losses: dict[str, dict[str, float]], base: str, experts: dict[str, str], general: str | None = None
) -> dict[str, dict]:
    """``losses[model][domain]`` -> per-model ``{"per_domain", "normalized", "forgetting", ...}``.

    ``experts`` maps each expert domain to the name of its expert model.
    """
    if base not in losses:
        raise KeyError(f"base model {base!r} has no results")
    out: dict[str, dict] = {}
    for name, dl in losses.items():
        per: dict[str, float | None] = {}
        for dom, ename in experts.items():
            if ename not in losses or dom not in dl or dom not in losses[base] or dom not in losses[ename]:
                per[dom] = None
                continue
            gain = losses[base][dom] - losses[ename][dom]
            per[dom] = None if gain <= 0 else (losses[base][dom] - dl[dom]) / gain
        vals = [v for v in per.values() if v is not None]
        row = {
            "per_domain": {k: (round(v, 4) if v is not None else None) for k, v in per.items()},
            "normalized": round(sum(vals) / len(vals), 4) if vals else None,
            "min_normalized": round(min(vals), 4) if vals else None,
        }
        if general and general in dl and general in losses[base]:
            lb = losses[base][general]
            row["forgetting"] = round((dl[general] - lb) / lb, 5)
            row["general_loss_delta"] = round(dl[general] - lb, 5)
        out[name] = row
    return out
