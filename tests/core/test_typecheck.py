import json
import os
import subprocess
import sys

import pytest
import torch
from jaxtyping import Float
from torch import Tensor

import gpt2_decl
from gpt2_decl import ShapeError, typechecked
from gpt2_decl.core import layers
from gpt2_decl.core.typecheck import shape_checked


@pytest.fixture(autouse=True)
def mode_off():
    previous = gpt2_decl.is_typechecked()
    gpt2_decl.set_typechecked(False)
    yield
    gpt2_decl.set_typechecked(previous)


def mlp_args(d_model=48, batch=2, seq=5, **changed):
    weights = dict(
        w_up=torch.randn(4 * d_model, d_model),
        b_up=torch.randn(4 * d_model),
        w_down=torch.randn(d_model, 4 * d_model),
        b_down=torch.randn(d_model),
    )
    return dict(x=torch.randn(batch, seq, d_model),
                weights=layers.MLPWeights(**{**weights, **changed}))


def test_wrong_rank_raises_shape_error_with_the_reason(tiny_model):
    with typechecked(), pytest.raises(ShapeError) as caught:
        tiny_model(torch.zeros(4, dtype=torch.long))
    message = str(caught.value)
    assert "\n" not in message
    assert (
        "GPT2.forward(): argument 'tokens' expected Int[Tensor, 'batch seq'], got int64[4]"
        in message
    )
    assert "this array has 1 dimensions, not the 2 expected" in message


def test_disagreeing_axis_names_the_weight_the_axis_and_the_bound_values():
    args = mlp_args(b_down=torch.randn(40))
    with typechecked(), pytest.raises(ShapeError) as caught:
        layers.mlp_up(**args)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("gpt2_decl.core.layers.mlp_up(): argument 'weights.b_down'")
    assert "expected Float[Tensor, 'd_model'], got float32[40]" in message
    assert (
        "the size of dimension d_model is 40 which does not equal the existing value of 48"
        in message
    )
    assert "(bound axes: batch=2 seq=5 d_model=48)" in message


def test_an_axis_expression_is_checked_once_its_axes_are_bound():
    # merge_heads binds d_model from the output projection, declared after the fused qkv one.
    heads = torch.randn(1, 4, 3, 8)
    weights = layers.AttentionWeights(torch.randn(96, 32), torch.randn(95), torch.randn(32, 32),
                                      torch.randn(32))
    with typechecked(), pytest.raises(ShapeError) as caught:
        layers.merge_heads(heads, weights)
    assert "argument 'weights.b_qkv' expected Float[Tensor, '3*d_model']" in str(caught.value)


def test_float_token_ids_raise_shape_error(tiny_model):
    with (
        typechecked(),
        pytest.raises(ShapeError, match=r"got float32\[2, 3\]: this array has dtype float32"),
    ):
        tiny_model(torch.zeros(2, 3))


def test_a_bad_result_is_caught_too():
    @shape_checked
    def drop_last(x: Float[Tensor, "batch seq"]) -> Float[Tensor, "batch seq"]:
        return x[:, :-1]

    with typechecked(), pytest.raises(ShapeError) as caught:
        drop_last(torch.randn(2, 5))
    assert (
        "drop_last(): return value expected Float[Tensor, 'batch seq'], got float32[2, 4]"
        in str(caught.value)
    )
    assert "the size of dimension seq is 4 which does not equal the existing value of 5" in str(
        caught.value
    )


def test_silent_when_off(tiny_model):
    args = mlp_args(b_down=torch.randn(1))  # broadcasts, so torch itself does not object
    out = layers.mlp_down(layers.gelu(layers.mlp_up(**args)), args["weights"])
    assert out.shape == (2, 5, 48)
    with pytest.raises(TypeError) as caught:  # the boundary check, not typechecked mode
        tiny_model(torch.zeros(2, 3))
    assert not isinstance(caught.value, ShapeError)


def test_valid_model_passes_all_checks_and_gives_the_same_logits(tiny_model, tokens):
    plain = tiny_model(tokens)
    with typechecked():
        checked = tiny_model(tokens)
    torch.testing.assert_close(plain, checked, rtol=0, atol=0)


def test_context_manager_restores_and_switches_at_runtime():
    assert not gpt2_decl.is_typechecked()
    with typechecked():
        assert gpt2_decl.is_typechecked()
        with typechecked(False):
            assert not gpt2_decl.is_typechecked()
        assert gpt2_decl.is_typechecked()
    assert not gpt2_decl.is_typechecked()
    gpt2_decl.set_typechecked(True)
    assert gpt2_decl.is_typechecked()


# Imports the package with the variable set, then reads the module afresh under other values.
READ_THE_VARIABLE = """
import importlib, json, os, sys
import gpt2_decl
from gpt2_decl.core import typecheck
seen = {os.environ["GPT2_DECL_TYPECHECK"]: gpt2_decl.is_typechecked()}
for value in sys.argv[1:]:
    os.environ["GPT2_DECL_TYPECHECK"] = value
    seen[value] = importlib.reload(typecheck).is_typechecked()
print(json.dumps(seen))
"""


def test_environment_variable_switches_it_on():
    expected = {"1": True, "true": True, " On ": True, "0": False, "": False, "no": False}
    first, *others = expected
    out = subprocess.run([sys.executable, "-c", READ_THE_VARIABLE, *others],
                         env={**os.environ, "GPT2_DECL_TYPECHECK": first},
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == expected
