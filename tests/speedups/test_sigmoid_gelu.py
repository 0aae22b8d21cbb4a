"""`sigmoid_gelu` against GELU's tanh approximation in float64, and `SigmoidGelu`: which GELUs
it rewrites (where timing says so, on the CPU), compiled forwards that match the model, and
gradients kept."""

import math

import pytest
import torch

import gpt2_decl
from gpt2_decl import GPT2, GPT2Config
from gpt2_decl.speedups import sigmoid_gelu
from gpt2_decl.speedups.sigmoid_gelu import SigmoidGelu
from tests.helpers import assert_compiled_gradients_are_eager, rewrites_in_trace, timing_says

CONFIG = GPT2Config(vocab_size=97, n_ctx=32, d_model=48, n_layer=2, n_head=3, init_std=0.2)


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation as GPT-2 writes it, in float64."""
    x = x.double()
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_the_sigmoid_form_is_the_tanh_approximation():
    x = torch.linspace(-12, 12, 10001, dtype=torch.float64)
    assert (sigmoid_gelu.sigmoid_gelu(x) - tanh_gelu(x)).abs().max() <= 1e-14
    x32 = x.float()  # in float32: within its rounding of the float64 values (about 1e-7 of 12)
    assert (sigmoid_gelu.sigmoid_gelu(x32).double() - tanh_gelu(x32)).abs().max() <= 5e-6
    with pytest.raises(ValueError, match="GELU's tanh approximation, got approximate='none'"):
        sigmoid_gelu.sigmoid_gelu(x, approximate="none")


@pytest.fixture
def timed_as(monkeypatch):
    """Make the timing say the sigmoid form wins (or loses), and record the dtypes timed."""
    return timing_says(monkeypatch, sigmoid_gelu, "time_gelu")


def rewritten(model: torch.nn.Module, *args, **kwargs) -> int:
    """How many GELUs SigmoidGelu rewrites in `model`'s traced forward on
    these arguments."""
    return rewrites_in_trace(model, SigmoidGelu().rewrite, *args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_tanh_gelu_is_rewritten_where_timing_says(timed_as, dtype):
    model = GPT2(CONFIG).to(dtype).eval()
    tokens = torch.randint(CONFIG.vocab_size, (2, 7))
    asked = timed_as(True)
    with torch.no_grad():
        assert rewritten(model, tokens) == CONFIG.n_layer
    assert set(asked) == {dtype}
    timed_as(False)
    with torch.no_grad():
        assert rewritten(model, tokens) == 0


def test_exact_gelu_is_left_alone(timed_as):
    asked = timed_as(True)
    exact = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU())  # approximate="none"
    assert rewritten(exact, torch.randn(3, 4)) == 0
    assert asked == []


def test_timing_compiles_both_forms_once_per_dtype(monkeypatch):
    monkeypatch.setattr(sigmoid_gelu, "_times", {})
    sigmoid_ms, tanh_ms = sigmoid_gelu.time_gelu(torch.float32)
    assert sigmoid_ms > 0 and tanh_ms > 0
    key = (*sigmoid_gelu.TIMED_SHAPE, torch.float32, torch.get_num_threads())
    assert sigmoid_gelu.timings() == {key: (sigmoid_ms, tanh_ms)}
    sigmoid_gelu._times[key] = (tanh_ms + 1, tanh_ms)  # no second timing: this is used
    assert not sigmoid_gelu.sigmoid_wins(torch.float32)
    assert "512x3072 float32: tanh" in sigmoid_gelu.describe()


def test_compiled_forward_matches_the_model(timed_as):
    model = GPT2(CONFIG).eval()
    tokens = torch.randint(CONFIG.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    timed_as(True)
    torch._dynamo.reset()
    with torch.no_grad():
        logits = gpt2_decl.compile(model, freeze=True, backend=SigmoidGelu())(tokens)
        exact = model.double()(tokens)
    assert (logits.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


def test_gradients_through_a_compiled_forward_are_the_models(timed_as):
    timed_as(True)
    model = GPT2(CONFIG).train()
    tokens = torch.randint(CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    assert_compiled_gradients_are_eager(model, SigmoidGelu(), tokens)

