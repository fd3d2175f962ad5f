"""Seeded random mutations of valid recipes (merge, multi-stage, MoE), each run through the CLI:
a mutant either merges or fails with exit 2 and one 'splice: error:' line (never a traceback,
never another exception), and a failure writes nothing and changes no input."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
import yaml

from splice.cli import main
from splice.multi import STAGE_MARKER

CASES = 100  # mutants per template family: bounded so the whole file runs in a few seconds
SEED = 20260513
TYPES = [None, 0, -1, 2, 1.5, -0.1, float("nan"), True, "", "x", "ties", [], [0], [2, 2], [3, 1], {}, {"a": 1}, [{"filter": "mlp"}]]


@pytest.fixture(scope="module")
def zoo(llama_trio):
    base, (a, b, _) = llama_trio  # the session's tiny models: no extra build
    return base, a, b


def _templates(base, a, b) -> dict[str, list]:
    """Valid recipes (each a list of YAML documents) that the mutants start from."""
    ties = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(a), "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
            {"model": str(b), "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}], "density": 0.7}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
        "tokenizer": {"source": "base"},
    }
    stack = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]}, {"sources": [{"model": str(b), "layer_range": [1, 2]}]}],
    }
    slerp = {
        "merge_method": "slerp",
        "base_model": str(a),
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [0, 2]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]},
    }
    multi = [
        {
            "name": "ab",
            "merge_method": "linear",
            "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}],
        },
        {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": "ab", "parameters": {"weight": 0.5}}]},
    ]
    return {"merge": [[ties], [stack], [slerp]], "multi": [multi]}


def _moe_template(base, a, b) -> list:
    return [
        {
            "base_model": str(base),
            "gate_mode": "random",
            "experts_per_token": 1,
            "experts": [{"source_model": str(a)}, {"source_model": str(b), "noise_scale": 0.01}],
        }
    ]


# ---------------------------------------------------------------- mutations


def _paths(node, path=()):
    """Every (container, key) in a document tree."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in list(items):
        out.append((node, k))
        out += _paths(v, path + (k,))
    return out


def _mutate_tree(rng: random.Random, docs: list) -> list:
    docs = yaml.safe_load_all(yaml.safe_dump_all(docs))  # a deep copy
    docs = list(docs)
    slots = [s for d in docs for s in _paths(d)]
    holder, key = rng.choice(slots)
    op = rng.choice(["delete", "retype", "rename", "duplicate-item"])
    if op == "delete":
        del holder[key]
    elif op == "retype":
        holder[key] = rng.choice(TYPES)
    elif op == "rename" and isinstance(holder, dict):
        k = str(key)
        i = rng.randrange(len(k))
        new = k[:i] + rng.choice("aeiorst_") + k[i + 1 :] if rng.random() < 0.7 else k.capitalize()
        holder[new] = holder.pop(key)
    elif isinstance(holder, list):
        holder.insert(key, holder[key])
    if rng.random() < 0.1 and len(docs) > 1:
        docs.pop(rng.randrange(len(docs)))
    return docs


def _mutate_text(rng: random.Random, text: str) -> bytes:
    lines = text.splitlines(keepends=True)
    op = rng.choice(["truncate", "duplicate-line", "alias", "billion", "deep", "indent", "byte", "separator"])
    if op == "truncate":
        return text[: rng.randrange(len(text))].encode()
    if op == "duplicate-line":
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
    elif op == "alias":  # anchor one value, refer to it from another line
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        if ": " in lines[i] and ": " in lines[j]:
            lines[i] = lines[i].replace(": ", ": &x ", 1)
            head = lines[j].split(": ", 1)[0]
            lines[j] = f"{head}: *x\n"
    elif op == "billion":
        laughs = "x0: &x0 [a, a, a, a, a, a, a, a]\n" + "".join(f"x{k + 1}: &x{k + 1} [{', '.join([f'*x{k}'] * 8)}]\n" for k in range(7))
        lines.insert(0, laughs)
    elif op == "deep":
        n = rng.choice([70, 5000])
        lines.append("parameters: " + "[" * n + "]" * n + "\n")
    elif op == "indent":
        i = rng.randrange(len(lines))
        lines[i] = rng.choice([" ", "\t", "  - "]) + lines[i]
    elif op == "byte":
        data = bytearray(text.encode())
        data.insert(rng.randrange(len(data)), rng.choice([0x00, 0xFF, 0x7B, 0x3A, 0x26, 0x2A, 0x21]))
        return bytes(data)
    else:
        lines.insert(rng.randrange(len(lines) + 1), "---\n")
    return "".join(lines).encode()


def _mutant(rng: random.Random, docs: list) -> bytes:
    if rng.random() < 0.5:
        return yaml.safe_dump_all(_mutate_tree(rng, docs), sort_keys=False).encode()
    return _mutate_text(rng, yaml.safe_dump_all(docs, sort_keys=False))


# ---------------------------------------------------------------- the property


def _fingerprint(folders) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for f in folders for p in sorted(f.rglob("*"))}


def _check(tmp_path, capsys, command, data: bytes, case: str) -> int:
    work = tmp_path / "work"
    work.mkdir()
    recipe = work / "r.yaml"
    recipe.write_bytes(data)
    out = work / "out"
    code = main([command, str(recipe), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    shown = f"{case}\n--- recipe ---\n{data[:2000]!r}\n--- stderr ---\n{err[-2000:]}"
    assert code in (0, 2), shown
    assert "Traceback" not in err, shown
    if code == 2:
        errors = [l for l in err.splitlines() if l.startswith("splice: error:")]
        assert len(errors) == 1, shown
        left = sorted(p.name for p in work.iterdir())
        if left == [".out.splice-stages", "r.yaml"]:  # a later stage failed: the finished ones are kept, and said so
            assert "finished stages are kept in" in errors[0], shown
            assert all((d / STAGE_MARKER).is_file() for d in (work / ".out.splice-stages").iterdir()), shown
        else:
            assert left == ["r.yaml"], shown  # nothing written, no leftovers
    assert recipe.read_bytes() == data, shown
    shutil.rmtree(work)
    return code


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_mutated_merge_and_multi_stage_recipes_fail_cleanly(tmp_path, zoo, capsys):
    base, a, b = zoo
    before = _fingerprint([base, a, b])
    rng = random.Random(SEED)
    families = _templates(base, a, b)
    templates = families["merge"] + families["multi"]
    for docs in templates:  # the templates themselves are valid
        assert _check(tmp_path, capsys, "merge", yaml.safe_dump_all(docs, sort_keys=False).encode(), "template") == 0
    codes = [_check(tmp_path, capsys, "merge", _mutant(rng, rng.choice(templates)), f"case {i} (seed {SEED})") for i in range(CASES)]
    assert codes.count(2) > CASES // 2 and codes.count(0) > 0  # the mutations mostly break recipes, and not all
    assert _fingerprint([base, a, b]) == before  # inputs untouched


def test_mutated_moe_recipes_fail_cleanly(tmp_path, zoo, capsys):
    base, a, b = zoo
    before = _fingerprint([base, a, b])
    rng = random.Random(SEED + 1)
    docs = _moe_template(base, a, b)
    assert _check(tmp_path, capsys, "moe", yaml.safe_dump_all(docs, sort_keys=False).encode(), "template") == 0
    codes = [_check(tmp_path, capsys, "moe", _mutant(rng, docs), f"case {i} (seed {SEED + 1})") for i in range(CASES // 2)]
    assert codes.count(2) > CASES // 4
    assert _fingerprint([base, a, b]) == before
