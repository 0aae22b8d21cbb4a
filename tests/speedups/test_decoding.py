"""The planned decoding step: one-query attention upcast to float32 against a float64
reference, and each rewrite made only where it applies."""

import math

import pytest
import torch
from helpers import rewrites_in_trace

from gpt2_decl import KVCache
from gpt2_decl.speedups import gemv
from gpt2_decl.speedups.decoding import DecodeStep, upcast_attention


def float64_attention(q, keys, values, visible):
    scores = q.double() @ keys.double().mT / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(-1) @ values.double()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_upcast_attention_matches_float64_and_hidden_keys_change_nothing(dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    q, keys, values = (torch.randn(2, 3, length, 16, generator=generator).to(dtype)
                       for length in (1, 10, 10))
    visible = (torch.arange(10) < 6).expand(2, 1, 1, 10)
    expected = float64_attention(q, keys, values, visible)
    ours = upcast_attention(q, keys, values, visible)
    assert ours.dtype == dtype
    assert torch.allclose(ours.double(), expected, atol=tolerance)
    keys[..., 6:, :], values[..., 6:, :] = 1e4, -1e4  # hidden keys change nothing
    assert torch.equal(upcast_attention(q, keys, values, visible), ours)


def test_a_step_rewrites_one_query_attention_only(tiny_model, tiny_config):
    prompt = torch.zeros(1, 5, dtype=torch.long)
    step = DecodeStep(upcast_attention=True)
    with torch.no_grad():
        whole = rewrites_in_trace(tiny_model, step, prompt)
        cache = KVCache(tiny_config, 1, 8, dtype=torch.float32, device="cpu")
        tiny_model(prompt, cache)
        one = rewrites_in_trace(tiny_model, step, torch.zeros(1, 1, dtype=torch.long), cache)
    assert whole == {} and one == {"upcast_attention": tiny_config.n_layer}


@pytest.mark.skipif(gemv.unavailable_reason() is not None, reason=f"{gemv.unavailable_reason()}")
def test_a_step_sends_every_product_to_the_kernel(tiny_model, tiny_config):
    gemv.load()
    cache = KVCache(tiny_config, 2, 8, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        tiny_model(torch.zeros(2, 5, dtype=torch.long), cache)
        counts = rewrites_in_trace(tiny_model, DecodeStep(gemv_kernel=True),
                                   torch.zeros(2, 1, dtype=torch.long), cache)
    assert counts == {"gemv_linear": 4 * tiny_config.n_layer + 1}
