"""The causal attention kernel against float64 attention, and `KernelAttention`: which
attention it sends through the kernel (where timing says so, and only causal self-attention with
no gradient, mask or dropout), compiled forwards that match the model, gradients kept."""

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

import gpt2_decl
from gpt2_decl import GPT2, GPT2Config
from gpt2_decl.speedups import causal_attention, row_kernels
from gpt2_decl.speedups.causal_attention import KernelAttention, kernel_causal_attention

CONFIG = GPT2Config(vocab_size=97, n_ctx=80, d_model=48, n_layer=2, n_head=3, init_std=0.2)

pytestmark = pytest.mark.skipif(row_kernels.load() is not None,
                                reason=f"no C++ kernel here: {row_kernels.load()}")


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention in float64, written out."""
    q, k, v = q.double(), k.double(), v.double()
    seq = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    hidden = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    return scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v


# One query row and a few; query rows in and past a task's six; keys in and past blocks of 64;
# every head size the kernel takes (16 to 128).
SHAPES = [(1, 1, 1, 16), (2, 3, 5, 16), (1, 2, 64, 64), (1, 2, 65, 64), (2, 2, 130, 32),
          (1, 3, 200, 48), (1, 1, 70, 80), (1, 1, 67, 96), (1, 1, 66, 112), (1, 2, 77, 128)]


@pytest.mark.parametrize(("batch", "heads", "seq", "d_head"), SHAPES)
def test_float32_attention_matches_float64_within_1e_5(batch, heads, seq, d_head):
    generator = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(batch, heads, seq, d_head, generator=generator) for _ in range(3))
    out = torch.ops.gpt2_decl.causal_attention(q, k, v, d_head ** -0.5)
    assert out.dtype == torch.float32 and out.shape == q.shape and out.is_contiguous()
    assert (out.double() - exact_attention(q, k, v)).abs().max() <= 1e-5


@pytest.mark.parametrize(("batch", "heads", "seq", "d_head"), SHAPES[:6])
def test_bfloat16_attention_is_float64_attention_rounded_to_bfloat16(batch, heads, seq, d_head):
    generator = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(batch, heads, seq, d_head, generator=generator).to(torch.bfloat16)
               for _ in range(3))
    out = torch.ops.gpt2_decl.causal_attention(q, k, v, d_head ** -0.5)
    exact = exact_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    # rounding to bfloat16 moves a value by at most half its last place (2^-9 of it)
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5).all()


def test_queries_keys_and_values_as_views_of_one_projection_and_a_given_scale():
    # as the model splits its fused projection: rows of each head 3 * d_model apart
    generator = torch.Generator().manual_seed(3)
    projection = torch.randn(2, 50, 3 * 4 * 16, generator=generator)
    q, k, v = projection.view(2, 50, 3, 4, 16).permute(2, 0, 3, 1, 4)
    out = kernel_causal_attention(q, k, v, is_causal=True, scale=0.3)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                              is_causal=True, scale=0.3)
    assert (out.double() - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(("call", "message"), [
    (lambda: torch.ops.gpt2_decl.causal_attention(torch.randn(2, 5, 16), torch.randn(2, 5, 16),
                                                  torch.randn(2, 5, 16), 1.0),
     "float32 or bfloat16 queries [batch, heads, seq, d_head], got [2, 5, 16] Float"),
    (lambda: torch.ops.gpt2_decl.causal_attention(torch.randn(1, 2, 5, 16),
                                                  torch.randn(1, 2, 6, 16),
                                                  torch.randn(1, 2, 5, 16), 1.0),
     "keys and values like its queries ([1, 2, 5, 16] Float), got [1, 2, 6, 16] Float"),
    (lambda: torch.ops.gpt2_decl.causal_attention(*(torch.randn(1, 2, 5, 20),) * 3, 1.0),
     "d_head a multiple of 16 up to 128, got 20"),
    (lambda: kernel_causal_attention(*(torch.randn(1, 2, 5, 16),) * 3),
     "kernel causal attention takes is_causal=True"),
])
def test_bad_input_is_refused_with_what_was_expected(call, message):
    with pytest.raises((RuntimeError, ValueError), match=re.escape(message)):
        call()


@pytest.fixture
def timed_as(monkeypatch):
    """Make the timing say the kernel wins (or loses), and record what was timed."""

    def set_outcome(wins: bool) -> list[tuple]:
        asked = []

        def time_attention(*shape):
            asked.append(shape)
            return (1.0, 2.0) if wins else (2.0, 1.0)

        monkeypatch.setattr(causal_attention, "time_attention", time_attention)
        return asked

    return set_outcome


def rewritten(model: GPT2, *args, **kwargs) -> int:
    """How many attentions KernelAttention sends through the kernel in `model`'s traced
    forward on these arguments."""
    counts = []

    def counting_backend(graph_module, example_inputs):
        counts.append(KernelAttention().rewrite(graph_module))
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(model, backend=counting_backend, fullgraph=True)(*args, **kwargs)
    [count] = counts
    return count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_goes_through_the_kernel_where_timing_says(timed_as, dtype):
    model = GPT2(CONFIG).to(dtype).eval()
    tokens = torch.randint(CONFIG.vocab_size, (2, 7))
    asked = timed_as(True)
    with torch.no_grad():
        assert rewritten(model, tokens) == CONFIG.n_layer
    assert set(asked) == {(2, CONFIG.n_head, 7, CONFIG.d_head, dtype)}
    timed_as(False)
    with torch.no_grad():
        assert rewritten(model, tokens) == 0


def test_attention_with_gradients_dropout_a_cache_or_odd_heads_is_left_alone(timed_as):
    asked = timed_as(True)
    tokens = torch.randint(CONFIG.vocab_size, (2, 7))
    model = GPT2(CONFIG).eval()
    assert rewritten(model, tokens) == 0  # gradients are recorded: the kernel has none
    with torch.no_grad():
        dropping = GPT2(dataclasses.replace(CONFIG, dropout=0.1)).train()
        assert rewritten(dropping, tokens) == 0
        cache = gpt2_decl.KVCache(CONFIG, 2, 16, dtype=torch.float32, device=torch.device("cpu"))
        assert rewritten(model, tokens, cache) == 0  # a mask over the cache's keys
        odd = GPT2(GPT2Config(vocab_size=97, n_ctx=16, d_model=40, n_layer=1, n_head=4)).eval()
        assert rewritten(odd, tokens) == 0  # d_head 10
    assert asked == []


def test_timing_is_taken_once_per_shape_and_decides(monkeypatch):
    monkeypatch.setattr(causal_attention, "_times", {})
    kernel_ms, library_ms = causal_attention.time_attention(1, 2, 40, 16, torch.float32)
    assert kernel_ms > 0 and library_ms > 0
    key = (1, 2, 40, 16, torch.float32, torch.get_num_threads())
    assert causal_attention.timings() == {key: (kernel_ms, library_ms)}
    causal_attention._times[key] = (library_ms + 1, library_ms)  # no second timing: this is used
    assert not causal_attention.kernel_wins(1, 2, 40, 16, torch.float32)
    causal_attention._times[key] = (library_ms, library_ms + 1)
    assert causal_attention.kernel_wins(1, 2, 40, 16, torch.float32)
    assert "1x2x40x16 float32: kernel" in causal_attention.describe()


@pytest.mark.parametrize("wins", [True, False])
def test_compiled_forward_matches_the_model(timed_as, wins):
    model = GPT2(CONFIG).eval()
    tokens = torch.randint(CONFIG.vocab_size, (2, 70), generator=torch.Generator().manual_seed(1))
    timed_as(wins)
    torch._dynamo.reset()
    with torch.no_grad():
        logits = gpt2_decl.compile(model, freeze=True, backend=KernelAttention())(tokens)
        exact = model.double()(tokens)
    assert (logits.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


def test_gradients_through_a_compiled_forward_are_the_models(timed_as):
    asked = timed_as(True)
    model = GPT2(CONFIG).train()
    tokens = torch.randint(CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    gpt2_decl.compile(model, backend=KernelAttention())(tokens).square().mean().backward()
    compiled = [parameter.grad.clone() for parameter in model.parameters()]
    model.zero_grad()
    model(tokens).square().mean().backward()
    for ours, eager in zip(compiled, (parameter.grad for parameter in model.parameters()),
                           strict=True):
        assert torch.allclose(ours, eager, rtol=1e-4, atol=1e-6)
    assert asked == []
