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
            r"r.yaml:1: merge_method: unknown merge method 'tiess'; did you mean 'ties'\? \(valid: .*ties",
        ),
        (
            "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n      desnity: 0.5\n",
            r"r.yaml:6: models\[0\]\.parameters\.desnity: unknown parameter 'desnity' for merge method 'ties'; did you mean 'density'\? \(valid: .*density",
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
