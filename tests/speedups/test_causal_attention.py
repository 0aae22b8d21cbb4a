"""The causal attention kernel against float64 attention, and `KernelAttention`: which
attention it sends through the kernel (where timing says so, and only causal self-attention with
no gradient, mask or dropout), compiled forwards that match the model, gradients kept. Prompts
over a cache: the masks that are causal after earlier keys, `EagerKernelAttention`, and
generation's choice of it."""

import dataclasses
import functools
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gpt2_decl
from gpt2_decl import GPT2, GPT2Config
from gpt2_decl.speedups import causal_attention, cpu_decoding, row_kernels
from gpt2_decl.speedups.causal_attention import (
    EagerKernelAttention,
    KernelAttention,
    kernel_causal_attention,
)
from gpt2_decl.text.generation import prefill_speedups
from tests.helpers import assert_compiled_gradients_are_eager, rewrites_in_trace, timing_says

CONFIG = GPT2Config(vocab_size=97, n_ctx=80, d_model=48, n_layer=2, n_head=3, init_std=0.2)

pytestmark = pytest.mark.skipif(row_kernels.load() is not None,
                                reason=f"no C++ kernel here: {row_kernels.load()}")


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int = 0,
                    scale: float | None = None) -> torch.Tensor:
    """Causal attention in float64, written out: query i sees keys 0 .. offset + i; scores
    scaled by `scale`, by default 1/sqrt(d_head)."""
    seq = q.shape[-2]
    q, k, v = q.double(), k[..., :offset + seq, :].double(), v[..., :offset + seq, :].double()
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    hidden = torch.arange(offset + seq)[None, :] > offset + torch.arange(seq)[:, None]
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


def bfloat16_bound(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: bool,
                   offset: int = 0, scale: float | None = None) -> torch.Tensor:
    """How far bfloat16 attention may be from float64's: rounding the output to bfloat16 moves
    it by at most half its last place (2^-9 of it). In matrix tiles the weights are rounded to
    bfloat16 too before they multiply the values (as the library's attention does), which moves
    the output by up to 2^-9 of the weighted sum of |values| and leaves the weights' total
    2^-9 off theirs."""
    exact = exact_attention(q, k, v, offset, scale).abs()
    if not tiles:
        return exact * 2**-8 + 1e-5
    return (exact + exact_attention(q, k, v.abs(), offset, scale)) * 2**-8 + 1e-5


# The bfloat16 ways: in matrix tiles (AMX), where the CPU has them, and widened to float32.
BFLOAT16_WAYS = [pytest.param(True, id="tiles"), pytest.param(False, id="widened")]


def skip_without_tiles(tiles: bool) -> None:
    if tiles and not torch.ops.gpt2_decl.bfloat16_tiles():
        pytest.skip("this CPU has no bfloat16 matrix tiles (AMX)")


@pytest.mark.parametrize("tiles", BFLOAT16_WAYS)
@pytest.mark.parametrize(("batch", "heads", "seq", "d_head"), SHAPES)
def test_bfloat16_attention_is_float64_attention_within_bfloat16_rounding(
        batch, heads, seq, d_head, tiles):
    skip_without_tiles(tiles)
    generator = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(batch, heads, seq, d_head, generator=generator).to(torch.bfloat16)
               for _ in range(3))
    out = torch.ops.gpt2_decl.causal_attention(q, k, v, d_head ** -0.5, 0, tiles)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and out.is_contiguous()
    assert ((out.double() - exact_attention(q, k, v)).abs()
            <= bfloat16_bound(q, k, v, tiles)).all()


def test_bfloat16_tiles_round_the_weights_as_the_library_does():
    # The library's attention also rounds its weights to bfloat16 for the values' product:
    # the widened way is closer to float64 than either.
    skip_without_tiles(True)
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 300, 64, generator=generator).to(torch.bfloat16)
               for _ in range(3))
    exact = exact_attention(q, k, v)
    errors = {name: (out.double() - exact).pow(2).mean().sqrt() for name, out in (
        ("tiles", torch.ops.gpt2_decl.causal_attention(q, k, v, 0.125, 0, True)),
        ("widened", torch.ops.gpt2_decl.causal_attention(q, k, v, 0.125, 0, False)),
        ("library", F.scaled_dot_product_attention(q, k, v, is_causal=True)))}
    assert errors["widened"] < errors["tiles"] < 1.1 * errors["library"]


# (batch, heads, seq, keys, offset, d_head): a query after a few keys, after more than a block
# of them, a prompt past its cache's first block, keys past the queries' last, a block's edge.
AFTER = [(1, 2, 1, 8, 5, 16), (2, 3, 7, 40, 33, 64), (1, 2, 70, 200, 100, 32),
         (1, 1, 5, 300, 290, 80), (1, 2, 64, 128, 64, 16)]


@pytest.mark.parametrize(("dtype", "tiles"), [
    pytest.param(torch.float32, False, id="float32"),
    pytest.param(torch.bfloat16, True, id="bfloat16-tiles"),
    pytest.param(torch.bfloat16, False, id="bfloat16-widened")])
@pytest.mark.parametrize(("batch", "heads", "seq", "keys", "offset", "d_head"), AFTER)
def test_queries_after_earlier_keys_see_those_and_their_own_up_to_themselves(
        batch, heads, seq, keys, offset, d_head, dtype, tiles):
    skip_without_tiles(tiles)
    generator = torch.Generator().manual_seed(keys)
    q = torch.randn(batch, heads, seq, d_head, generator=generator).to(dtype)
    k, v = (torch.randn(batch, heads, keys, d_head, generator=generator).to(dtype)
            for _ in range(2))
    k[:, :, offset + seq:], v[:, :, offset + seq:] = float("nan"), float("nan")  # never read
    out = torch.ops.gpt2_decl.causal_attention(q, k, v, d_head ** -0.5, offset, tiles)
    exact = exact_attention(q, k, v, offset)
    assert out.dtype == dtype and out.shape == q.shape
    bound = 1e-5 if dtype == torch.float32 else bfloat16_bound(q, k, v, tiles, offset)
    assert ((out.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize(("dtype", "tiles"), [
    pytest.param(torch.float32, False, id="float32"),
    pytest.param(torch.bfloat16, True, id="bfloat16-tiles")])
def test_queries_keys_and_values_as_views_of_one_projection_and_a_given_scale(dtype, tiles):
    # as the model splits its fused projection: rows of each head 3 * d_model apart
    skip_without_tiles(tiles)
    generator = torch.Generator().manual_seed(3)
    projection = torch.randn(2, 50, 3 * 4 * 16, generator=generator).to(dtype)
    q, k, v = projection.view(2, 50, 3, 4, 16).permute(2, 0, 3, 1, 4)
    out = kernel_causal_attention(q, k, v, is_causal=True, scale=0.3)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                              is_causal=True, scale=0.3)
    bound = 1e-5 if dtype == torch.float32 else bfloat16_bound(q, k, v, tiles, scale=0.3)
    assert ((out.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize(("call", "message"), [
    (lambda: torch.ops.gpt2_decl.causal_attention(torch.randn(2, 5, 16), torch.randn(2, 5, 16),
                                                  torch.randn(2, 5, 16), 1.0),
     "float32 or bfloat16 queries [batch, heads, seq, d_head], got [2, 5, 16] Float"),
    (lambda: torch.ops.gpt2_decl.causal_attention(torch.randn(1, 2, 5, 16),
                                                  torch.randn(1, 2, 6, 16),
                                                  torch.randn(1, 2, 6, 16), 1.0, 2),
     "keys and values [batch, heads, offset + seq or more, d_head] like its queries "
     "([1, 2, 5, 16] Float, offset 2), got [1, 2, 6, 16] Float"),
    (lambda: torch.ops.gpt2_decl.causal_attention(*(torch.randn(1, 2, 5, 16),) * 3, 1.0, -1),
     "an offset of 0 or more, got -1"),
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
    return timing_says(monkeypatch, causal_attention, "time_attention")


def rewritten(model: torch.nn.Module, *args, **kwargs) -> int:
    """How many attentions KernelAttention sends through the kernel in `model`'s traced forward on
    these arguments."""
    return rewrites_in_trace(model, KernelAttention().rewrite, *args, **kwargs)


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
    assert_compiled_gradients_are_eager(model, KernelAttention(), tokens)
    assert asked == []


def cache_mask(max_len: int, lengths: list[int], start: list[int] | None = None) -> torch.Tensor:
    """The mask a KVCache gives the last of prompts of `lengths` run one after another."""
    cache = gpt2_decl.KVCache(CONFIG, 1 if start is None else len(start), max_len,
                              dtype=torch.float32, device=torch.device("cpu"),
                              start=None if start is None else torch.tensor(start))
    for length in lengths:
        slots = cache.reserve(length)
    return cache.visible(slots)


def test_causal_offset_is_the_number_of_earlier_keys_of_a_cache_without_padding():
    assert causal_attention.causal_offset(cache_mask(20, [7]), 7, 20) == 0
    assert causal_attention.causal_offset(cache_mask(20, [7, 3]), 3, 20) == 7
    assert causal_attention.causal_offset(torch.ones(4, 4).tril().bool()[None, None], 4, 4) == 0


def test_masks_that_are_not_causal_have_no_offset():
    padded = cache_mask(20, [7], start=[0, 2])  # the second row's first two slots hidden
    assert causal_attention.causal_offset(padded, 7, 20) is None
    assert causal_attention.causal_offset(torch.ones(1, 1, 4, 6, dtype=torch.bool), 4, 6) is None
    holed = cache_mask(20, [7]).clone()
    holed[0, 0, 5, 2] = False
    assert causal_attention.causal_offset(holed, 7, 20) is None
    assert causal_attention.causal_offset(cache_mask(20, [7]).float(), 7, 20) is None
    assert causal_attention.causal_offset(cache_mask(20, [7]), 6, 20) is None  # not its shape


def kernel_calls(run) -> int:
    """How many times `run()` calls the causal kernel."""
    calls = []

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func is torch.ops.gpt2_decl.causal_attention.default)
            return func(*args, **(kwargs or {}))

    with Recording():
        run()
    return sum(calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_run_over_a_cache_goes_through_the_kernel_and_matches_the_model(dtype):
    model = GPT2(CONFIG).eval()
    tokens = torch.randint(CONFIG.vocab_size, (2, 50), generator=torch.Generator().manual_seed(5))

    def prompts(model: GPT2) -> torch.Tensor:
        cache = gpt2_decl.KVCache(CONFIG, 2, 60, dtype=model.dtype, device=torch.device("cpu"))
        model(tokens[:, :20], cache)
        return model(tokens[:, 20:], cache)  # after 20 earlier keys

    with torch.no_grad():
        exact = prompts(model.double())
        model.to(dtype)
        outputs = []
        with EagerKernelAttention():
            calls = kernel_calls(lambda: outputs.append(prompts(model)))
    assert calls == 2 * CONFIG.n_layer
    bound = 1e-5 if dtype == torch.float32 else 0.05  # bfloat16: the model's own rounding
    assert (outputs[0].double() - exact).abs().max() <= bound * exact.abs().max()


def test_plain_causal_attention_goes_through_the_kernel_too():
    model = GPT2(CONFIG).eval()
    tokens = torch.randint(CONFIG.vocab_size, (1, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), EagerKernelAttention():
        assert kernel_calls(lambda: model(tokens)) == CONFIG.n_layer


def test_padding_gradients_and_dropout_keep_the_librarys_attention():
    tokens = torch.randint(CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(7))
    model = GPT2(CONFIG).eval()
    cache = gpt2_decl.KVCache(CONFIG, 2, 12, dtype=torch.float32, device=torch.device("cpu"),
                              start=torch.tensor([0, 3]))
    with torch.no_grad():
        expected = model(tokens, cache)
        cache.length.zero_()
        with EagerKernelAttention():
            assert kernel_calls(lambda: torch.testing.assert_close(
                model(tokens, cache), expected, rtol=0, atol=0)) == 0
    dropping = GPT2(dataclasses.replace(CONFIG, dropout=0.1)).train()
    with EagerKernelAttention():
        assert kernel_calls(lambda: model(tokens)) == 0  # gradients recorded
        with torch.no_grad():
            assert kernel_calls(lambda: dropping(tokens)) == 0


@pytest.mark.parametrize(("times", "start"), [
    ({32: (1.0, 2.0), 256: (1.0, 2.0), 1024: (1.0, 2.0)}, 1),  # faster at every length
    ({32: (2.0, 1.0), 256: (1.0, 2.0), 1024: (1.0, 2.0)}, 256),
    ({32: (1.0, 2.0), 256: (2.0, 1.0), 1024: (1.0, 2.0)}, 1024),
    ({32: (1.0, 2.0), 256: (1.0, 2.0), 1024: (2.0, 2.0)}, 0),  # a tie at the longest: never
    ({}, 0),
])
def test_prompts_attend_through_the_kernel_from_the_length_where_it_won_on(
        monkeypatch, times, start):
    monkeypatch.setattr(cpu_decoding, "_choices", {})
    monkeypatch.setattr(cpu_decoding, "_time_prefill_attention", lambda model: dict(times))
    choice = cpu_decoding.choice_for(GPT2(CONFIG).eval())
    assert choice.prefill_attention_from == start
    assert choice.prefill_attention_times_ms == times
    if times:
        described = "off" if not start else f"from {start} tokens"
        assert f"prompt's attention through the causal kernel {described}" in choice.describe()


def test_prompt_attention_is_timed_at_short_and_long_prompts_both_ways():
    with torch.no_grad():
        timed = cpu_decoding._time_prefill_attention(GPT2(CONFIG).eval())
        odd = GPT2(GPT2Config(vocab_size=97, n_ctx=16, d_model=40, n_layer=1, n_head=4)).eval()
        assert cpu_decoding._time_prefill_attention(odd) == {}  # d_head 10
    assert list(timed) == [32, CONFIG.n_ctx]  # the longest timed: the whole context
    assert all(kernel > 0 and library > 0 for kernel, library in timed.values())


def test_compiled_generation_runs_a_long_prompts_attention_through_the_kernel(monkeypatch):
    monkeypatch.setattr(cpu_decoding, "_choices", {})
    monkeypatch.setattr(cpu_decoding, "_time_prefill_attention",
                        lambda model: {8: (2.0, 1.0), 32: (1.0, 2.0), 80: (1.0, 2.0)})
    model = GPT2(CONFIG).eval()
    prompt = torch.randint(CONFIG.vocab_size, (1, 40), generator=torch.Generator().manual_seed(8))
    cpu_decoding.choice_for(model)  # timed before the calls are counted
    for prompt_len, calls in [(40, CONFIG.n_layer), (8, 0)]:  # from 32 tokens on
        cache = gpt2_decl.KVCache(CONFIG, 1, 50, dtype=torch.float32, device=torch.device("cpu"))
        with torch.no_grad(), prefill_speedups(model, True, 1, prompt_len):
            assert kernel_calls(functools.partial(model, prompt[:, :prompt_len], cache)) == calls
    assert torch.equal(model.generate(prompt, 6, greedy=True, compile=True),
                       model.generate(prompt, 6, greedy=True))
