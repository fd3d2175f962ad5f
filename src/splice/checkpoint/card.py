"""A merge's model card (README.md) and the chat templates a recipe can name."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


def _model_template(src) -> str | None:
    d = src.tokenizer_dir()
    if d is None:
        return None
    p = Path(d) / "chat_template.jinja"
    if p.exists():
        return p.read_text(encoding="utf-8")
    p = Path(d) / "tokenizer_config.json"
    if p.exists():
        try:
            ct = json.loads(p.read_text(encoding="utf-8")).get("chat_template")
        except ValueError:
            return None
        return ct if isinstance(ct, str) else None
    return None


def resolve_chat_template(spec: str | None, sources: dict) -> str | None:
    from ..errors import RecipeError

    if spec is None:
        return None
    if spec == "auto":
        from collections import Counter

        found = [t for t in (_model_template(s) for s in sources.values()) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    if "{{" in spec or "{%" in spec:
        return spec
    raise RecipeError(f"chat_template {spec!r}: not a known name (auto, {', '.join(CHAT_TEMPLATES)}) nor a Jinja template")


def model_card(plan, hashes: dict[str, str], version: str, seed: int, tok_files: list[str]) -> str:
    recipe = plan.recipe
    models = recipe.referenced_models()
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- splice",
        "- merge",
        "base_model:",
        *[f"- {m}" for m in models],
        "---",
        f"# {recipe.name or 'Merged model'}",
        "",
        f"This model was made with [splice](https://pypi.org/project/splice/) {version} using the "
        f"**{plan.method.name}** method ({plan.method.paper or plan.method.summary}).",
        "",
        "## Sources",
        "",
    ]
    for m in models:
        role = " (base)" if m == recipe.base_model else ""
        lines.append(f"- `{m}`{role}")
    lines += [
        "",
        f"Output: {len(plan.layer_sources)} layers, {len(plan.jobs)} tensors, seed {seed}.",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe.to_yaml(),
        "```",
        "",
        "## Files",
        "",
        "| file | SHA-256 |",
        "|---|---|",
        *[f"| {f} | `{h}` |" for f, h in hashes.items()],
        "",
    ]
    return "\n".join(lines)
