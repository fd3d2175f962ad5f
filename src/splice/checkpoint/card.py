"""Everything a merged folder holds beside its weights: config, tokenizer, generation config, model card."""

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


def _set_chat_template(dest: Path, template: str) -> None:
    (dest / "chat_template.jinja").write_text(template, encoding="utf-8")
    tc = dest / "tokenizer_config.json"
    if tc.exists():
        try:
            data = json.loads(tc.read_text(encoding="utf-8"))
        except ValueError:
            data = {}
        data.pop("chat_template", None)
        tc.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_side_files(writer, plan, sources: dict, opts) -> None:
    """config.json, tokenizer files, generation_config.json and README.md for a merge plan."""
    from .. import __version__
    from ..tokenizer import write_tokenizer

    recipe = plan.recipe
    writer.write_json("config.json", plan.config)
    tok_files = write_tokenizer(plan.tokenizer, recipe, sources, plan.reference, writer.tmp)
    template = resolve_chat_template(recipe.chat_template, sources)
    if template:
        _set_chat_template(writer.tmp, template)
    gen = sources[plan.reference].generation_config()
    if gen:
        writer.write_json("generation_config.json", gen)
    if opts.write_card:
        hashes = writer.file_hashes()
        writer.write_text("README.md", model_card(plan, hashes, __version__, opts.seed, tok_files))


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
