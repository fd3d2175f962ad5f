"""Method parameters in recipes and the APIs: ranges, types, unused and unknown names, zero sums.

Every value the recipe already holds is checked at parse time, with file:line and the
key path; values only known per tensor (gradients evaluated at a layer, the in-memory
API) are checked by the method before it runs.
"""

from __future__ import annotations

import pytest
import torch
import yaml

import splice
from splice.cli import main
from splice.errors import RecipeError
from splice.methods import get_method
from splice.recipe import load_recipe
from splice.registry import UnknownName


def _load(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return load_recipe(p)


HEAD = "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n"  # model parameters from line 6
TIES = HEAD + "      weight: 1.0\n"


@pytest.mark.parametrize(
    "text,expected",
    [
        (TIES + "      density: 1.5\n", r"r.yaml:7: models\[0\]\.parameters\.density: must be a number in \[0, 1\], got 1.5$"),
        (TIES + "      density: -0.1\n", r"r.yaml:7: models\[0\]\.parameters\.density: must be a number in \[0, 1\], got -0.1$"),
        (
            TIES + "      density: [0.2, 0.5, 1.2]\n",
            r"r.yaml:7: models\[0\]\.parameters\.density\[2\]: must be a number in \[0, 1\], got 1.2$",
        ),
        (
            TIES + "      density:\n        - filter: mlp\n          value: [0.5, 2]\n        - value: 0.5\n",
            r"r.yaml:9: models\[0\]\.parameters\.density\[0\]\.value\[1\]: must be a number in \[0, 1\], got 2$",
        ),
        (HEAD + "      weight: .nan\n", r"r.yaml:6: models\[0\]\.parameters\.weight: must be a finite number, got nan$"),
        (TIES + "parameters:\n  lambda: .inf\n", r"r.yaml:8: parameters\.lambda: must be a finite number, got inf$"),
        (TIES + "parameters:\n  normalize: 'yes'\n", r"r.yaml:8: parameters\.normalize: must be true or false, got 'yes'$"),
        (TIES + "parameters:\n  normalize: 2\n", r"r.yaml:8: parameters\.normalize: must be true or false, got 2$"),
        (TIES + "      density: lots\n", r"r.yaml:7: models\[0\]\.parameters\.density: must be a number in \[0, 1\], got 'lots'$"),
        (TIES + "      density: true\n", r"must be a number in \[0, 1\], got True$"),
        (
            "merge_method: slerp\nbase_model: b\nmodels: [a]\nparameters: {t: 1.7}\n",
            r"r.yaml:4: parameters\.t: must be a number in \[0, 1\], got 1.7$",
        ),
        (
            "merge_method: nearswap\nbase_model: b\nmodels: [a]\nparameters: {t: -0.01}\n",
            r"parameters\.t: must be a number >= 0, got -0.01$",
        ),
        (
            "merge_method: sce\nbase_model: b\nmodels: [a]\nparameters: {select_topk: 0}\n",
            r"parameters\.select_topk: must be a number in \(0, 1\], got 0$",
        ),
        ("merge_method: karcher\nmodels: [a, c]\nparameters: {max_iter: 0}\n", r"parameters\.max_iter: must be an integer >= 1, got 0$"),
        (
            "merge_method: karcher\nmodels: [a, c]\nparameters: {max_iter: 2.5}\n",
            r"parameters\.max_iter: must be an integer >= 1, got 2.5$",
        ),
        ("merge_method: karcher\nmodels: [a, c]\nparameters: {tol: -1.0e-5}\n", r"parameters\.tol: must be a number >= 0, got -1e-05$"),
        ("merge_method: multislerp\nmodels: [a, c]\nparameters: {weight: 1, eps: 0}\n", r"parameters\.eps: must be a number > 0, got 0$"),
        (
            "merge_method: breadcrumbs\nbase_model: b\nmodels: [a]\nparameters: {weight: 1, gamma: 1.5}\n",
            r"parameters\.gamma: must be a number in \[0, 1\], got 1.5$",
        ),
        (
            "merge_method: della\nbase_model: b\nmodels: [a]\nparameters: {weight: 1, epsilon: 1}\n",
            r"parameters\.epsilon: must be a number in \[0, 1\), got 1$",
        ),
        (
            "merge_method: pcb\nbase_model: b\nmodels: [a]\nparameters: {density: 1.01}\n",
            r"parameters\.density: must be a number in \[0, 1\], got 1.01$",
        ),
        (
            "merge_method: passthrough\nmodels:\n  - model: a\n    parameters: {scale: .nan}\n",
            r"parameters\.scale: must be a finite number, got nan$",
        ),
    ],
)
def test_out_of_range_values_are_refused_at_parse_time(tmp_path, text, expected):
    with pytest.raises(RecipeError, match=expected):
        _load(tmp_path, text)


def test_numbers_as_strings_are_converted_as_mergekit_does(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string; mergekit's pydantic takes it as a number
    r = _load(tmp_path, "merge_method: karcher\nmodels: [a, c]\nparameters:\n  tol: 1e-3\n  max_iter: '7'\n")
    assert r.parameters == {"tol": 0.001, "max_iter": 7}
    r = _load(tmp_path, TIES + "      density: [{filter: mlp, value: '1e-1'}]\n")
    assert r.models[0].parameters["density"] == [{"filter": "mlp", "value": 0.1}]
    assert r.raw["models"][0]["parameters"]["density"] == [{"filter": "mlp", "value": "1e-1"}]  # the recipe as written


def test_values_inside_the_ranges_parse(tmp_path):
    r = _load(tmp_path, TIES + "      density: [0, 0.5, 1]\nparameters:\n  normalize: 0\n  lambda: -2.5\n")
    assert r.models[0].parameters["density"] == [0, 0.5, 1] and r.parameters == {"normalize": 0, "lambda": -2.5}


def test_parameters_only_other_methods_take_warn_once_and_are_ignored(tmp_path):
    r = _load(
        tmp_path,
        "merge_method: model_stock\nbase_model: b\nmodels:\n"
        "  - model: a\n    parameters: {t: 0.5, normalize: true}\n"
        "  - model: c\n    parameters: {t: 0.5, normalize: true}\n"
        "parameters:\n  int8_mask: true\n  filter_wise: true\n",
    )
    f = tmp_path / "r.yaml"
    assert r.warnings == [  # the recipe-wide parameters are read first
        f"{f}:9: parameters.int8_mask: parameter 'int8_mask' is not used by merge method 'model_stock'; ignored",
        f"{f}:5: models[0].parameters.t: parameter 't' is not used by merge method 'model_stock'; ignored",
        f"{f}:5: models[0].parameters.normalize: parameter 'normalize' is not used by merge method 'model_stock'; ignored",
    ]
    assert r.models[0].parameters == {} and r.parameters == {"filter_wise": True}


def test_a_global_parameter_set_for_one_model_warns_that_it_is_ignored(tmp_path):
    r = _load(tmp_path, TIES + "      normalize: false\n      lambda: 0.5\n  - model: c\n    parameters: {weight: 1, normalize: false}\n")
    f = tmp_path / "r.yaml"
    assert r.warnings == [
        f"{f}:7: models[0].parameters.normalize: parameter 'normalize' of merge method 'ties' is global: set for one model "
        "it is ignored (as mergekit does); set it in the recipe's or the slice's parameters",
        f"{f}:8: models[0].parameters.lambda: parameter 'lambda' of merge method 'ties' is global: set for one model "
        "it is ignored (as mergekit does); set it in the recipe's or the slice's parameters",
    ]
    assert r.models[0].parameters == {"weight": 1.0} and r.models[1].parameters == {"weight": 1}


@pytest.mark.parametrize(
    "method,text,expected",
    [
        (
            "ties",
            TIES + "      densty: 0.5\n",
            r"unknown parameter 'densty' for merge method 'ties' \(valid: weight, density,.*\); did you mean 'density'\?",
        ),
        # a name only other methods take is suggested when the method has nothing close
        (
            "linear",
            "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1, densty: 0.5}\n",
            r"'densty' for merge method 'linear' \(valid: .*\); did you mean 'density'\?",
        ),
        (
            "ties",
            TIES + "      qwerty: 1\n",
            r"r.yaml:7: models\[0\]\.parameters\.qwerty: unknown parameter 'qwerty' for merge method 'ties' \(valid: ",
        ),
    ],
)
def test_a_name_no_method_takes_is_an_error_with_a_suggestion(tmp_path, method, text, expected):
    with pytest.raises(RecipeError, match=expected):
        _load(tmp_path, text)


def test_unknown_method_suggests_the_closest():
    with pytest.raises(UnknownName, match=r"unknown merge method 'tiess' \(valid: .*\); did you mean 'ties'\?"):
        get_method("tiess")
    with pytest.raises(
        RecipeError, match=r"<recipe>:1: merge_method: unknown merge method 'dare_tie' \(valid: .*\); did you mean 'dare_ties'\?"
    ):
        load_recipe("merge_method: dare_tie\nbase_model: b\nmodels: [a]\n")


# ----------------------------------------------------------------- through the engine and the CLI


def _write(tmp_path, data):
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_unused_parameter_warning_is_one_line_per_name_on_a_real_merge(tmp_path, llama_trio, capsys):
    base, (a, b, _) = llama_trio
    data = {
        "merge_method": "model_stock",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"normalize": True}} for m in (a, b)],
    }
    assert main(["merge", str(_write(tmp_path, data)), "-o", str(tmp_path / "out"), "-q"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "parameter 'normalize' is not used by merge method 'model_stock'; ignored" in warnings[0]
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_weights_summing_to_zero_fail_in_one_line_naming_tensor_and_weights(tmp_path, llama_trio, capsys):
    _, (a, b, _) = llama_trio
    data = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": w}} for w in (1.0,)]}
    data["models"].append({"model": str(b), "parameters": {"weight": -1.0}})
    code = main(["merge", str(_write(tmp_path, data)), "-o", str(tmp_path / "out"), "-q"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert (
        lines[0].startswith("splice: error: tensor ")
        and "linear failed: normalize divides by the sum of the weights [1.0, -1.0], which is 0" in lines[0]
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "method,params,expected",
    [
        ("task_arithmetic", {"normalize": True}, r"normalize divides by the sum of the weights \[1.0, -1.0\], which is 0"),
        (
            "ties",
            {"density": 1.0},
            r"normalize divides each element by the weights of the models that agree on its sign, and the weights \[1.0, -1.0\] cancel",
        ),
        ("nuslerp", {}, r"nuslerp interpolates at t = w1 / \(w0 \+ w1\), and the weights \[1.0, -1.0\] sum to 0"),
        ("multislerp", {}, r"normalize_weights divides by the sum of the weights \[1.0, -1.0\], which is 0"),
    ],
)
def test_zero_sums_of_weights_in_the_in_memory_api(method, params, expected):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 6, generator=g)
    # deltas of opposite sign: with weights 1 and -1 they agree everywhere under TIES
    ts = [base + torch.rand(6, 6, generator=g) + 0.1, base - torch.rand(6, 6, generator=g) - 0.1]
    with pytest.raises(ValueError, match=expected):
        splice.merge_tensors(method, ts, base, weight=[1.0, -1.0], **params)


def test_the_in_memory_api_checks_evaluated_values():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"parameter 'density' must be a number in \[0, 1\], got 1.5"):
        splice.merge_tensors("ties", [a], b, weight=1.0, density=1.5)
    with pytest.raises(ValueError, match=r"parameter 't' must be a number in \[0, 1\], got 1.7"):
        splice.merge_tensors("slerp", [a], b, t=1.7)
    with pytest.raises(ValueError, match=r"parameter 'weight' has 3 values for 1 models"):
        splice.merge_tensors("linear", [a], weight=[1.0, 2.0, 3.0])
