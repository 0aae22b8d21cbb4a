"""bfloat16 GEMMs upcast to float32: within the library's rounding of the exact product, and
rewritten only where they are GEMMs (two or more rows) of bfloat16 or int8 weights."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rewrites_in_trace

from gpt2_decl import GPT2
from gpt2_decl.core.activations import Taps
from gpt2_decl.speedups.upcast import UpcastLinear, UpcastProducts, upcast_linear, upcast_matmul


def test_an_upcast_product_rounds_once_as_the_library_does():
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(size, generator=generator).to(torch.bfloat16)
                       for size in ((9, 300), (40, 300), (40,)))
    exact = F.linear(x.double(), weight.double(), bias.double())
    ours, library = upcast_linear(x, weight, bias), F.linear(x, weight, bias)
    assert ours.dtype == torch.bfloat16
    # One rounding of a float32 sum to bfloat16: within half a bfloat16 ulp (2^-8 relative).
    assert ((ours.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-3).all()
    assert (ours.double() - library.double()).abs().max() <= 2 * 2**-8 * exact.abs().max()


@pytest.mark.parametrize("batch, seq, upcast", [(1, 1, 0), (1, 2, 9), (3, 1, 9)])
def test_gemms_of_bfloat16_weights_are_upcast_and_gemvs_are_not(tiny_config, batch, seq, upcast):
    model = GPT2(tiny_config).to(torch.bfloat16).eval()
    tokens = torch.zeros(batch, seq, dtype=torch.long)
    with torch.no_grad():
        counts = rewrites_in_trace(model, UpcastProducts(), tokens)
    # Four products a block, two blocks, and the head.
    assert counts == ({"upcast_linear": upcast} if upcast else {})


def test_a_batched_product_of_activations_rounds_once_as_the_library_does():
    generator = torch.Generator().manual_seed(0)
    q, keys = (torch.randn(size, generator=generator).to(torch.bfloat16)
               for size in ((2, 3, 9, 64), (2, 3, 64, 11)))
    exact = q.double() @ keys.double()
    ours, library = upcast_matmul(q, keys), q @ keys
    assert ours.dtype == torch.bfloat16
    assert ((ours.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-3).all()
    assert (ours.double() - library.double()).abs().max() <= 2 * 2**-8 * exact.abs().max()


@pytest.mark.parametrize("dtype, upcast", [(torch.bfloat16, {"upcast_linear": 9,
                                                             "upcast_matmul": 2}),
                                           (torch.float32, {})])
def test_the_products_of_a_layer_that_gives_its_pattern_are_upcast_too(tiny_config, dtype,
                                                                       upcast):
    model = GPT2(tiny_config).to(dtype).eval()
    taps = Taps(capture=frozenset({"blocks.1.pattern"}))
    with torch.no_grad():
        counts = rewrites_in_trace(model, UpcastProducts(), torch.zeros(1, 5, dtype=torch.long),
                                   taps=taps)
    # Block 1 multiplies queries by keys and its pattern by the values; block 0 uses the
    # library's attention, which has no product in the graph.
    assert counts == upcast


def test_float32_products_are_left_alone(tiny_model, tokens):
    with torch.no_grad():
        assert rewrites_in_trace(tiny_model, UpcastProducts(), tokens) == {}


def test_eager_prompts_upcast_within_the_mode_and_gradients_stay_with_the_library(tiny_config):
    model = GPT2(tiny_config).to(torch.bfloat16).eval()
    tokens = torch.randint(tiny_config.vocab_size, (2, 7),
                           generator=torch.Generator().manual_seed(1))
    exact = GPT2(tiny_config).double().eval()(tokens)
    with torch.no_grad(), UpcastLinear():
        upcast = model(tokens).double()
    with torch.no_grad():
        library = model(tokens).double()
    assert (upcast - exact).abs().max() <= 1.5 * (library - exact).abs().max() + 1e-2
    with UpcastLinear():
        loss = model(tokens).float().square().mean()
    loss.backward()  # the library's product, which has a gradient
    assert model.lm_head.weight.grad is not None
