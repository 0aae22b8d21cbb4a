"""bfloat16 products done in float32: against a float64 reference, the backend's rewrite where
timing says so and nowhere else, and a compiled forward against the longhand model."""

import pytest
import torch
import torch.nn.functional as F

import gpt2_decl
from gpt2_decl import GPT2, GPT2Config
from gpt2_decl.speedups import cpu_decoding, wide_products
from gpt2_decl.speedups.quantize import int8_rows, quantize
from gpt2_decl.speedups.wide_products import WideLinear, WideProducts, wide_linear
from gpt2_decl.text.generation import prefill_speedups
from tests.helpers import model_of_kind, reference_logits, timing_says

CONFIG = GPT2Config(vocab_size=97, n_ctx=32, d_model=48, n_layer=2, n_head=4, init_std=0.2)
# Each block's four products and the output head.
PRODUCTS = 4 * CONFIG.n_layer + 1


def operands(dtype: torch.dtype, rows: int = 5):
    generator = torch.Generator().manual_seed(3)
    x, weight, bias = (torch.randn(size, generator=generator).to(dtype)
                       for size in ((2, rows, 48), (40, 48), (40,)))
    return x, weight, bias


@pytest.mark.parametrize("with_bias", [True, False])
def test_wide_linear_is_the_float64_product_rounded_once_to_bfloat16(with_bias):
    x, weight, bias = operands(torch.bfloat16)
    bias = bias if with_bias else None
    result = wide_linear(x, weight, bias)
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    assert result.dtype == torch.bfloat16 and result.shape == (2, 5, 40)
    # Summed in float32, then rounded to bfloat16 (8 significant bits): within half a unit of
    # the last place, plus float32's sums.
    assert ((result.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-4).all()
    library = F.linear(x, weight, bias)
    assert ((result.double() - library.double()).abs() <= exact.abs() * 2**-7 + 1e-4).all()


def test_wide_linear_gradients_match_float64():
    x, weight, bias = (tensor.requires_grad_() for tensor in operands(torch.bfloat16))
    wide_linear(x, weight, bias).sum().backward()
    x64, weight64, bias64 = (tensor.detach().double().requires_grad_()
                             for tensor in (x, weight, bias))
    F.linear(x64, weight64, bias64).sum().backward()
    for tensor, exact in ((x, x64), (weight, weight64), (bias, bias64)):
        assert tensor.grad.dtype == torch.bfloat16
        assert (tensor.grad.double() - exact.grad).abs().max() <= exact.grad.abs().max() * 2**-7


@pytest.fixture
def timed_as(monkeypatch):
    """Make every timing say widening wins (True) or loses (False); records the shapes asked."""
    return timing_says(monkeypatch, wide_products, "time_product")


def rewrites(model: GPT2, *batches: torch.Tensor, dynamic: bool = False) -> list[int]:
    """How many products WideProducts widens in each graph traced of `model`'s forward on
    `batches` of tokens, in turn."""
    counts = []

    def counting_backend(graph_module, example_inputs):
        counts.append(WideProducts().rewrite(graph_module))
        return graph_module.forward

    compiled = torch.compile(model, backend=counting_backend, fullgraph=True, dynamic=dynamic)
    for tokens in batches:
        compiled(tokens)
    return counts


def rewritten(model: GPT2, tokens: torch.Tensor) -> int:
    """How many products WideProducts widens in `model`'s traced forward on `tokens`."""
    [count] = rewrites(model, tokens)
    return count


def test_the_products_of_bfloat16_weights_are_widened_where_timing_says(timed_as):
    model = GPT2(CONFIG).to(torch.bfloat16).eval()
    tokens = torch.randint(CONFIG.vocab_size, (2, 7))
    asked = timed_as(True)
    with torch.no_grad():
        assert rewritten(model, tokens) == PRODUCTS
    d_model, d_mlp = CONFIG.d_model, 4 * CONFIG.d_model
    assert set(asked) == {(14, d_model, 3 * d_model, torch.bfloat16),
                          (14, d_model, d_model, torch.bfloat16),
                          (14, d_model, d_mlp, torch.bfloat16),
                          (14, d_mlp, d_model, torch.bfloat16),
                          (14, d_model, CONFIG.vocab_size, torch.bfloat16)}
    torch._dynamo.reset()
    timed_as(False)
    with torch.no_grad():
        assert rewritten(model, tokens) == 0


def test_a_dynamic_number_of_rows_is_timed_at_the_rows_traced(timed_as):
    model = GPT2(CONFIG).to(torch.bfloat16).eval()
    asked = timed_as(True)
    with torch.no_grad():  # one graph for both lengths
        counts = rewrites(model, *(torch.randint(CONFIG.vocab_size, (2, seq)) for seq in (7, 9)),
                          dynamic=True)
    assert counts == [PRODUCTS]
    assert {rows for rows, *_ in asked} == {14}


def test_float32_quantized_and_one_row_products_are_left_alone(timed_as):
    asked = timed_as(True)
    tokens = torch.randint(CONFIG.vocab_size, (2, 7))
    with torch.no_grad():
        assert rewritten(GPT2(CONFIG).eval(), tokens) == 0
        torch._dynamo.reset()
        bfloat16 = GPT2(CONFIG).to(torch.bfloat16).eval()
        assert rewritten(bfloat16, tokens[:1, :1]) == 0
        torch._dynamo.reset()
        assert rewritten(quantize(bfloat16, "int8"), tokens) == 0
    assert asked == []


def test_timing_is_taken_once_per_shape_and_decides(monkeypatch):
    monkeypatch.setattr(wide_products, "_times", {})
    wide_ms, library_ms = wide_products.time_product(8, 48, 5000, torch.bfloat16)
    assert wide_ms > 0 and library_ms > 0
    key = (8, 48, wide_products.TIMED_ROWS, torch.bfloat16, torch.get_num_threads())
    assert wide_products.timings() == {key: (wide_ms, library_ms)}
    wide_products._times[key] = (library_ms + 1, library_ms)  # no second timing: this is used
    assert not wide_products.widening_wins(8, 48, 5000, torch.bfloat16)
    wide_products._times[key] = (library_ms, library_ms + 1)
    assert wide_products.widening_wins(8, 48, 5000, torch.bfloat16)
    assert "8x48x4096 bfloat16: widened" in wide_products.describe()


@pytest.mark.parametrize("wins", [True, False])
def test_compiled_bfloat16_forward_matches_the_longhand_model(timed_as, wins):
    model = GPT2(CONFIG).to(torch.bfloat16).eval()
    tokens = torch.randint(CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    timed_as(wins)
    with torch.no_grad():
        logits = gpt2_decl.compile(model, backend=WideProducts())(tokens)
        wide = GPT2(CONFIG).eval()
        wide.load_state_dict({name: tensor.double() for name, tensor in
                              model.state_dict().items()})
        exact = reference_logits(wide.double(), tokens)
        eager = model(tokens)
    assert logits.dtype == torch.bfloat16
    # bfloat16 activations between the layers: the compiled forward is as far from the exact
    # one as eager is, within a few of bfloat16's units.
    scale = exact.abs().max().item()
    eager_error = (eager.double() - exact).abs().max().item()
    assert (logits.double() - exact).abs().max().item() <= 2 * eager_error + scale * 2**-7


def test_wide_linear_dequantizes_a_weight_only_int8_weight_to_float32():
    model = gpt2_decl.quantize(GPT2(CONFIG).eval(), "int8")
    linear = model.blocks[0].mlp.up
    qdata, scale, zero_point = (tensor.double() for tensor in int8_rows(linear.weight))
    x = torch.randn(6, CONFIG.d_model, generator=torch.Generator().manual_seed(2))
    exact = x.double() @ ((qdata - zero_point) * scale).T + linear.bias.double()
    with torch.no_grad():
        result = wide_linear(x, linear.weight, linear.bias)
    assert result.dtype == torch.float32
    assert (result.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


@pytest.fixture
def widened_inputs(monkeypatch) -> list[torch.Size]:
    """The shape of the input of each product that goes through `wide_linear`."""
    shapes = []
    real = wide_products.wide_linear
    monkeypatch.setattr(wide_products, "wide_linear",
                        lambda x, *args: shapes.append(x.shape) or real(x, *args))
    return shapes


def kind_of_model(kind: str) -> GPT2:
    return model_of_kind(CONFIG, kind)


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_wide_linear_mode_takes_the_products_of_its_rows_and_matches_them(widened_inputs, kind):
    model = kind_of_model(kind)
    tokens = torch.randint(CONFIG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        eager = model(tokens).double()
        with WideLinear(max_rows=14, min_rows=14):
            widened = model(tokens).double()
    d_model = CONFIG.d_model
    # Every product of the blocks and the head, each of the 2 x 7 rows at once.
    assert widened_inputs == [(2, 7, d_model), (2, 7, d_model), (2, 7, d_model),
                              (2, 7, 4 * d_model)] * CONFIG.n_layer + [(2, 7, d_model)]
    assert (widened - eager).abs().max() <= 0.02 * eager.abs().max()


@pytest.mark.parametrize("case", ["fewer rows", "more rows", "gradients", "float32",
                                  "int8 activations"])
def test_wide_linear_mode_leaves_other_products_to_the_model(monkeypatch, case):
    kind = {"float32": "float32", "int8 activations": "int8-dynamic"}.get(case, "bfloat16")
    model = kind_of_model(kind)
    tokens = torch.randint(CONFIG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(wide_products, "wide_linear", lambda *args: pytest.fail("taken"))
    rows = {"fewer rows": (15, 20), "more rows": (2, 13)}.get(case, (2, 14))
    with torch.set_grad_enabled(case == "gradients"), WideLinear(rows[1], min_rows=rows[0]):
        logits = model(tokens)
    assert logits.shape == (2, 7, CONFIG.vocab_size)
    assert logits.requires_grad == (case == "gradients")


def test_compiled_generation_widens_a_long_prompt_where_that_timed_fastest(monkeypatch,
                                                                          widened_inputs):
    monkeypatch.setattr(cpu_decoding, "_choices", {})
    times = {32: {"kernel": 1.0, "wide": 2.0, "library": 3.0},  # the kernel up to 32 rows,
             256: {"kernel": 2.0, "wide": 1.0, "library": 3.0}}  # widened past it up to 256
    monkeypatch.setattr(cpu_decoding, "_time_prefill", lambda model: times)
    model = kind_of_model("bfloat16")
    prompt = torch.randint(CONFIG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = model(prompt, last_only=True).double()
        with prefill_speedups(model, True, *prompt.shape):
            logits = model(prompt, last_only=True).double()
        with prefill_speedups(model, True, 2, 16):  # 32 rows: the kernel's, not widened
            model(prompt[:, :16], last_only=True)
    # The blocks' products of 2 x 17 rows; the head's of the last positions is the kernel's.
    assert [shape[:-1] for shape in widened_inputs] == [(2, 17)] * 4 * CONFIG.n_layer
    assert (logits - eager).abs().max() <= 0.02 * eager.abs().max()
