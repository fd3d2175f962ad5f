"""The Python API: the same methods and parameters as recipes, in memory."""

import pytest
import torch

import splice
from splice.errors import RecipeError


def test_merge_tensors_linear_and_per_model_lists():
    a, b = torch.ones(4, 4), torch.zeros(4, 4)
    out = splice.merge_tensors("linear", [a, b], weight=[3, 1])
    torch.testing.assert_close(out, torch.full((4, 4), 0.75))
    out = splice.merge_tensors("linear", [a, b], weight=1.0)  # scalar applies to every model
    torch.testing.assert_close(out, torch.full((4, 4), 0.5))


def test_merge_tensors_keeps_dtype_and_rejects_unknown_parameters():
    a = torch.randn(8, 8).to(torch.bfloat16)
    out = splice.merge_tensors("slerp", [a], a, t=0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, a)
    with pytest.raises(RecipeError, match="unknown parameter"):
        splice.merge_tensors("linear", [a], weight=1, desnity=0.3)
    with pytest.raises(RecipeError, match="needs a base"):
        splice.merge_tensors("slerp", [a], None, t=0.5)


def test_merge_state_dicts_matches_tensor_api():
    g = torch.Generator().manual_seed(0)
    sds = [{"x": torch.randn(4, 4, generator=g), "n": torch.tensor([1, 2])} for _ in range(2)]
    out = splice.merge_state_dicts("linear", sds, parameters=[{"weight": 1}, {"weight": 3}])
    torch.testing.assert_close(out["x"], (sds[0]["x"] + 3 * sds[1]["x"]) / 4)
    assert torch.equal(out["n"], sds[0]["n"])
