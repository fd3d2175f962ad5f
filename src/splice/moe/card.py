"""The model card (README.md) of a MoE built or compressed by splice."""

from __future__ import annotations

from pathlib import Path


def _front(models: list[str], tags: list[str], base_dir: Path | None = None) -> list[str]:
    from ..checkpoint.card import front_matter

    return front_matter(models, base_dir, tags)


def _files(hashes: dict[str, str]) -> list[str]:
    return ["## Files", "", "| file | SHA-256 |", "|---|---|", *[f"| {f} | `{h}` |" for f, h in hashes.items()], ""]


def moe_card(plan, hashes: dict[str, str], opts, calib) -> str:
    from .. import __version__

    r = plan.recipe
    lines = _front(r.models(), ["moe", plan.family.name], Path(r.path).parent if r.path is not None else None)
    lines += [
        f"# {r.name or 'Mixture of experts'}",
        "",
        f"A {plan.family.title} mixture of {len(r.experts)} experts ({r.experts_per_token} per token) made with splice {__version__}: "
        "attention, norms and embeddings from the base, each expert's MLP from its donor.",
        "",
        "## Experts",
        "",
        "| # | source | prompts |",
        "|---|---|---|",
        *[
            f"| {i} | `{e.source_model}` | {len(e.positive_prompts)} positive, {len(e.negative_prompts)} negative |"
            for i, e in enumerate(r.experts)
        ],
        *[f"| shared | `{e.source_model}` | {len(e.positive_prompts)} positive |" for e in r.shared_experts],
        "",
        f"Base: `{r.base_model}`. Routers initialised with gate_mode `{r.gate_mode}` (seed {opts.seed}).",
    ]
    if calib is not None:
        lines += [
            "",
            f"Routers calibrated for {calib.steps} steps on {sum(calib.tokens)} tokens of the experts' own text; held-out routing accuracy "
            f"(top-1 expert is the text's own) {calib.acc_before:.1%} before, {calib.acc_after:.1%} after.",
        ]
    lines += ["", "## Recipe", "", "```yaml", r.to_yaml(), "```", ""]
    lines += _files(hashes)
    return "\n".join(lines)


def compress_card(src_name: str, summary: dict, hashes: dict[str, str]) -> str:
    from .. import __version__

    lines = _front([src_name], ["moe", "moe-compress"])
    lines += [
        "# Compressed mixture of experts",
        "",
        f"`{src_name}` with its {summary['experts_before']} experts per layer merged into {summary['experts']} by splice {__version__} "
        "(M-SMoE style: experts grouped around the most used ones by router-logit similarity, neurons aligned by permutation, "
        f"merged weighted by usage on {summary['tokens']} calibration tokens).",
        "",
        "## Groups per layer",
        "",
        "| layer | groups (leader first) | usage of each old expert |",
        "|---|---|---|",
        *[f"| {l} | {g} | {', '.join(f'{u:.3f}' for u in us)} |" for l, (g, us) in enumerate(zip(summary["groups"], summary["usage"]))],
        "",
    ]
    lines += _files(hashes)
    return "\n".join(lines)
