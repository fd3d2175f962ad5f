"""A merge's model card (README.md), the recipe file beside it, and the chat templates a recipe can name.

The card opens with the YAML front matter the Hugging Face Hub reads (``base_model``,
``tags``, ``library_name``), as mergekit writes it; ``base_model`` lists only the inputs
that are Hub ids (local paths are left out, as mergekit leaves them out).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

# what a Hugging Face model id looks like: "name" or "owner/name"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# the recipe file beside the card: the names mergekit writes (and tools and the Hub look for)
MERGE_RECIPE_FILE = "mergekit_config.yml"
MOE_RECIPE_FILE = "mergekit_moe_config.yml"

CARD_TAGS = ["merge", "mergekit", "splice"]

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


def is_hub_id(ref: str, base_dir: Path | None = None) -> bool:
    """Whether a model reference names a Hub repository rather than a local path.

    Like mergekit, a reference starting with ``/``, ``~`` or ``.``, or with more than one ``/``,
    is local. Unlike mergekit, which asks the Hub about a Hub-like name that also exists on disk,
    splice never goes to the network: a name that exists on disk (from the current folder or
    the recipe's) is local.
    """
    if not _HUB_ID.match(ref) or ref.endswith((".gguf", ".safetensors")):
        return False
    return not (Path(os.path.expanduser(ref)).exists() or (base_dir is not None and (base_dir / ref).exists()))


def hub_ids(refs: Iterable[str], base_dir: Path | None = None) -> list[str]:
    """The Hub ids among ``refs`` (both parts of a ``model+lora`` reference), in order, once each."""
    seen: dict[str, None] = {}
    for ref in refs:
        for part in str(ref).split("+") if "+" in str(ref) and not Path(str(ref)).exists() else [str(ref)]:
            if is_hub_id(part, base_dir):
                seen[part] = None
    return list(seen)


def front_matter(refs: Iterable[str], base_dir: Path | None = None, extra_tags: Iterable[str] = ()) -> list[str]:
    """The card's YAML front matter lines (``---`` to ``---``): base_model (Hub ids only), tags, library_name."""
    tags = list(dict.fromkeys([*CARD_TAGS, *extra_tags]))
    meta = {"base_model": hub_ids(refs, base_dir), "tags": tags, "library_name": "transformers"}
    return ["---", yaml.safe_dump(meta, sort_keys=False, default_flow_style=False).rstrip(), "---"]


def recipe_text(recipe) -> str:
    """The recipe as written beside the card: the file's own text when it came from a file
    (as mergekit copies its config file), else the recipe dumped as YAML."""
    if recipe.path is not None and not getattr(recipe, "derived", False):  # a MoE config has no derived form
        try:
            return Path(recipe.path).read_text(encoding="utf-8")
        except OSError:
            pass
    return recipe.to_yaml() + "\n"


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
    base_dir = Path(recipe.path).parent if recipe.path is not None else None
    lines = [
        *front_matter(models, base_dir),
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
