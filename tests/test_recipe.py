"""Recipe parsing: mergekit keys, parameter settings, and one-line errors that say where."""

import pytest

from splice.errors import RecipeError
from splice.recipe import evaluate, load_recipe


def test_scalar_gradient_and_filters_follow_mergekit():
    assert evaluate(0.3, "x", 0.7) == 0.3
    # gradient: linear interpolation over relative depth
    assert evaluate([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate([0.0, 1.0, 0.0], "x", 1.0) == pytest.approx(0.0)
    # filters: first match wins, no filter = default
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.9}]
    assert evaluate(setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.1
    assert evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate(setting, "model.norm.weight", 0.5) == 0.9
    assert evaluate([{"filter": "mlp", "value": 1}], "model.norm.weight", 0) is None


def test_mergekit_recipe_parses(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        """
models:
  - model: a
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: b
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
tokenizer_source: union
"""
    )
    r = load_recipe(p)
    assert r.merge_method == "ties"
    assert r.base_model == "base"
    assert [m.model for m in r.models] == ["a", "b"]
    assert r.dtype == "bfloat16"
    assert r.tokenizer_source == "union"
    assert r.referenced_models() == ["base", "a", "b"]


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "merge_method: tiess\nmodels: [{model: a}]\n",
            r"r.yaml:1: merge_method: unknown merge method 'tiess' \(valid: .*ties.*\); did you mean 'ties'\?",
        ),
        (
            "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n      desnity: 0.5\n",
            r"r.yaml:6: models\[0\]\.parameters\.desnity: unknown parameter 'desnity' for merge method 'ties' \(valid: .*density.*\); did you mean 'density'\?",
        ),
        (
            "merge_method: linear\nmodels: [{model: a}]\nbogus: 1\n",
            r"r.yaml:3: bogus: unknown key 'bogus' in the recipe \(valid: merge_method",
        ),
        ("merge_method: linear\n", r"give exactly one of 'models' or 'slices'"),
        ("merge_method: ties\nmodels: [{model: a}]\n", r"needs a base_model"),
        (
            "merge_method: passthrough\nslices:\n  - sources:\n    - model: a\n      layer_range: [0]\n",
            r"r.yaml:5: slices\[0\]\.sources\[0\]\.layer_range: layer_range must be",
        ),
        ("merge_method: linear\nmodels: [{model: a}]\ndtype: fp13\n", r"r.yaml:3: dtype: unknown dtype 'fp13'"),
        ("merge_method: linear\nmodels: [{model: a\n", r"r.yaml:\d+: invalid YAML"),
    ],
)
def test_errors_name_key_line_and_choices(tmp_path, text, expected):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=expected) as e:
        load_recipe(p)
    assert "\n" not in str(e.value)


def test_slices_must_have_equal_lengths(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        "merge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\nslices:\n  - sources:\n"
        "    - {model: a, layer_range: [0, 4]}\n    - {model: b, layer_range: [0, 3]}\n"
    )
    with pytest.raises(RecipeError, match="same number of layers"):
        load_recipe(p)


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("nope/recipe.yaml")


# ---------------------------------------------------------------- the safe YAML reader (issue 13.8, 13.10, 13.15)

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)  # 9**9 (387 million) strings once expanded, from a few hundred bytes
DEEP_LIST = "merge_method: linear\nmodels: " + "[" * 20_000 + "]" * 20_000 + "\n"
DEEP_MAP = "merge_method: linear\nparameters: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n"


@pytest.mark.parametrize(
    "text,expected",
    [
        (LAUGHS, r"r.yaml:\d+: aliases expand this value to more than 100000 YAML nodes \(MAX_YAML_NODES"),
        (DEEP_LIST, r"r.yaml:2: nested deeper than 64 levels \(MAX_YAML_DEPTH\)"),
        (DEEP_MAP, r"r.yaml:2: nested deeper than 64 levels \(MAX_YAML_DEPTH\)"),
    ],
)
def test_hostile_yaml_is_refused_quickly_in_one_line(tmp_path, text, expected):
    import time

    p = tmp_path / "r.yaml"
    p.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match=expected) as e:
        load_recipe(p)
    assert time.perf_counter() - t0 < 15.0  # bounded: minutes and 850 MB before (a loaded 2-core machine takes ~2 s)
    assert "\n" not in str(e.value)


def test_aliases_within_the_limit_still_work_as_in_mergekit(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        "merge_method: ties\nbase_model: base\nmodels:\n"
        "  - model: a\n    parameters: &p {weight: 1.0, density: 0.5}\n  - model: b\n    parameters: *p\n"
        "parameters:\n  <<: {normalize: true}\n  int8_mask: true\n"
    )
    r = load_recipe(p)
    assert r.models[1].parameters == {"weight": 1.0, "density": 0.5} and r.parameters == {"normalize": True, "int8_mask": True}


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "merge_method: linear\nmodels: [{model: a}]\nmerge_method: ties\n",
            r"r.yaml:3: key 'merge_method' is given twice in one mapping \(lines 1 and 3\); YAML would keep only the last",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n      weight: 2\n",
            r"r.yaml:6: key 'weight' is given twice in one mapping \(lines 5 and 6\)",
        ),
        (
            "merge_method: linear\nmodels: [{model: a, model: b}]\n",
            r"r.yaml:2: key 'model' is given twice in one mapping \(both on line 2\)",
        ),
        ("merge_method: linear\nmodels: &m [{model: a}, *m]\n", r"r.yaml:2: an alias refers to a mapping or list that contains it"),
        (
            "merge_method: linear\nmodels: [{model: a}]\ndtype: !!python/object/apply:os.system [touch x]\n",
            r"r.yaml:3: invalid YAML \(could not determine a constructor",
        ),
        ("merge_method: linear\nmodels: [{model: a\x00}]\n", r"r.yaml:2: invalid YAML \(character U\+0000 is not allowed in YAML\)"),
        ("merge_method: linear\nmodels:\n\t- model: a\n", r"r.yaml:3: invalid YAML \(found character '\\t'"),
    ],
)
def test_yaml_refusals_name_the_line(tmp_path, text, expected):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=expected) as e:
        load_recipe(p)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()  # no code ran


def test_a_file_name_that_does_not_exist_is_a_missing_file_not_yaml_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("recipe.yml.txt", "my-recipe", "nope/recipe.yaml", str(tmp_path / "gone.yaml")):
        with pytest.raises(RecipeError, match=rf"^recipe file '{name}' not found: the file does not exist$"):
            load_recipe(name)
    with pytest.raises(RecipeError, match=r"is a folder, not a recipe file"):
        load_recipe(str(tmp_path))
    # YAML text is still YAML text: a key separator, a flow mapping, or several lines
    assert load_recipe("{merge_method: linear, models: [{model: a}]}").models[0].model == "a"
    with pytest.raises(RecipeError, match=r"give exactly one of 'models' or 'slices'"):
        load_recipe("merge_method: linear")
    (tmp_path / "a: b.yaml").write_text("merge_method: linear\nmodels: [{model: from-file}]\n")
    assert load_recipe("a: b.yaml").models[0].model == "from-file"  # an existing file wins


def test_unreadable_non_utf8_oversized_and_empty_files(tmp_path, monkeypatch):
    from pathlib import Path

    from splice.yamlfile import MAX_YAML_BYTES

    p = tmp_path / "r.yaml"
    p.write_bytes(b"merge_method: linear\nmodels: [{model: \xff\xfe}]\n")
    with pytest.raises(RecipeError, match=rf"^{p}:2: the recipe is not UTF-8 text \(byte 0xff at offset 38\)$"):
        load_recipe(p)
    p.write_text("# " + "x" * MAX_YAML_BYTES)
    with pytest.raises(RecipeError, match=rf"^{p}: \d+ bytes is too large for a recipe \(at most {MAX_YAML_BYTES}\)"):
        load_recipe(p)
    p.write_text("# nothing\n---\n")
    with pytest.raises(RecipeError, match=rf"^{p}: the recipe is empty$"):
        load_recipe(p)
    p.write_text("merge_method: linear\nmodels: [{model: a}]\n")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(RecipeError, match=rf"^{p}: cannot read the recipe \(Permission denied\)$"):
        load_recipe(p)


def test_line_map_follows_documents_and_keys():
    from splice.yamlfile import parse_yaml

    docs = parse_yaml("a: 1\nb:\n  - x: 2\n---\n# empty next\n---\nc: 3\n", "f.yaml")
    assert [d.data for d in docs] == [{"a": 1, "b": [{"x": 2}]}, {"c": 3}]
    assert docs[0].lines[("b", 0, "x")] == 3 and docs[1].lines[("c",)] == 7
    assert [d.index for d in docs] == [0, 2] and docs[1].line == 7


# ---------------------------------------------------------------- structure (issue 13.8) and unknown keys (issue 9.2)


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "merge_method: passthrough\nslices:\n  - sources:\n    - model: a\n      layer_range: [2, 2]\n",
            r"r.yaml:5: slices\[0\]\.sources\[0\]\.layer_range: layer_range \[2, 2\] spans no layers \(end is exclusive: \[2, 3\] is layer 2 alone\)",
        ),
        (
            "merge_method: passthrough\nslices:\n  - sources:\n    - {model: a, layer_range: [3, 1]}\n",
            r"r.yaml:4: .*layer_range must be \[start, end\]",
        ),
        ("merge_method: passthrough\nslices:\n  - sources:\n    - {model: a, layer_range: [-1, 2]}\n", r"layer_range must be"),
        ("merge_method: passthrough\nslices:\n  - sources:\n    - {model: a, layer_range: [0.5, 2]}\n", r"layer_range must be"),
        ("merge_method: passthrough\nslices:\n  - sources:\n    - {model: a, layer_range: [true, 2]}\n", r"layer_range must be"),
        ("merge_method: passthrough\nslices:\n  - sources:\n    - {model: a}\n", r"r.yaml:4: .*layer_range must be .*got None"),
        ("merge_method: passthrough\nslices:\n  - sources: []\n", r"r.yaml:3: slices\[0\]: a slice needs a non-empty 'sources' list"),
        ("merge_method: linear\nmodels: []\n", r"r.yaml:2: models: 'models' must be a non-empty list"),
        ("merge_method: linear\nmodels: [{parameters: {weight: 1}}]\n", r"r.yaml:2: models\[0\]: missing 'model'"),
        ("merge_method: linear\nmodels: [{model: ''}]\n", r"a model reference must be a path or a Hugging Face id"),
        ("merge_method: linear\nmodels: [{model: a}]\nname: 5\n", r"r.yaml:3: name: name must be a non-empty string, got 5"),
        ("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: ''\n", r"r.yaml:3: tokenizer_source: a model reference must be"),
        (
            "merge_method: linear\nmodels: [{model: a}]\ntokenizer: {source: union, pad_to_multiple_of: true}\n",
            r"pad_to_multiple_of: must be a positive integer, got True",
        ),
        (
            "merge_method: linear\nmodels: [{model: a}]\nparameters: {weight: [{filter: 1.5, value: 1}]}\n",
            r"r.yaml:3: parameters\.weight\[0\]\.filter: a filter is part of a tensor name \(a string\), got 1.5",
        ),
        # unknown keys: an error (mergekit ignores them), with the closest valid key
        (
            "merge_method: linear\nmodels: [{model: a}]\ndype: float16\n",
            r"r.yaml:3: dype: unknown key 'dype' in the recipe \(valid: .*\); did you mean 'dtype'\?$",
        ),
        (
            "merge_method: linear\nmodels: [{model: a}]\nParameters: {}\n",
            r"r.yaml:3: Parameters: unknown key .*; did you mean 'parameters'\?$",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: a\n    paramters: {}\n",
            r"r.yaml:4: models\[0\]\.paramters: unknown key 'paramters' in a model entry .*did you mean 'parameters'\?$",
        ),
        (
            "merge_method: passthrough\nslices:\n  - source: []\n",
            r"r.yaml:3: slices\[0\]\.source: unknown key 'source' in a slice .*did you mean 'sources'\?$",
        ),
        (
            "merge_method: passthrough\nslices:\n  - sources:\n    - {model: a, layer_rnage: [0, 2]}\n",
            r"r.yaml:4: slices\[0\]\.sources\[0\]\.layer_rnage: unknown key 'layer_rnage' in a slice source .*did you mean 'layer_range'\?$",
        ),
        (
            "merge_method: linear\nmodels: [{model: a}]\ntokenizer: {sorce: union}\n",
            r"r.yaml:3: tokenizer\.sorce: unknown key 'sorce' in 'tokenizer' .*did you mean 'source'\?$",
        ),
        (
            "merge_method: linear\nmodels: [{model: a}]\nzzz: 1\n",
            r"unknown key 'zzz' in the recipe \(valid: [^)]*\)$",
        ),  # nothing close: no guess
        (
            "merge_method: tiess\nmodels: [{model: a}]\n",
            r"r.yaml:1: merge_method: unknown merge method 'tiess' \(valid: .*\); did you mean 'ties'\?$",
        ),
    ],
)
def test_structure_errors_exit_2_from_the_cli_and_write_nothing(tmp_path, capsys, text, expected):
    from splice.cli import main

    d = tmp_path / "case"
    d.mkdir()
    p = d / "r.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=expected):
        load_recipe(p)
    assert main(["merge", str(p), "-o", str(d / "out"), "-q"]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("splice: error: ")
    assert [x.name for x in d.iterdir()] == ["r.yaml"]


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "base_model: b\ngate_mod: random\nexperts: [{source_model: a}]\n",
            r"r.yaml:2: gate_mod: unknown key 'gate_mod' in the MoE recipe .*did you mean 'gate_mode'\?$",
        ),
        (
            "base_model: b\ngate_mode: random\nexperts:\n  - source_model: a\n    positive_prompt: [x]\n",
            r"r.yaml:5: experts\[0\]\.positive_prompt: unknown key 'positive_prompt' in an expert .*did you mean 'positive_prompts'\?$",
        ),
        (
            "base_model: b\ngate_mode: hiden\nexperts: [{source_model: a}]\n",
            r"r.yaml:2: gate_mode: unknown gate_mode 'hiden' \(valid: .*\); did you mean 'hidden'\?$",
        ),
        (
            "base_model: b\ngate_mode: random\nexperts: [{source_model: a}]\nbase_model: c\n",
            r"r.yaml:4: key 'base_model' is given twice in one mapping \(lines 1 and 4\)",
        ),
        (
            "base_model: b\ngate_mode: random\nexperts_per_token: 1\nexperts: [{source_model: a}]\nname: [x]\n",
            r"r.yaml:5: name: name must be a non-empty string",
        ),
        ("base_model: b\nexperts: " + "[" * 20_000 + "]" * 20_000 + "\n", r"r.yaml:2: nested deeper than 64 levels"),
    ],
)
def test_moe_recipe_errors_exit_2_and_write_nothing(tmp_path, capsys, text, expected):
    from splice.cli import main
    from splice.moe import load_moe_recipe

    d = tmp_path / "case"
    d.mkdir()
    p = d / "r.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=expected):
        load_moe_recipe(p)
    assert main(["moe", str(p), "-o", str(d / "out"), "-q"]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("splice: error: ")
    assert [x.name for x in d.iterdir()] == ["r.yaml"]


def test_missing_moe_recipe_file(tmp_path):
    from splice.moe import load_moe_recipe

    with pytest.raises(RecipeError, match=r"^MoE recipe file 'moe.yaml' not found: the file does not exist$"):
        load_moe_recipe("moe.yaml")
