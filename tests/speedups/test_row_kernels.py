"""The C++ kernels: row products against float64 products, attention over the visible keys
against float64 attention, both through compiled decoding steps, products through generation
(beside the other ways of doing products: test_cpu_decoding), and their build: refused input
and a failed build each say what went wrong."""

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import decode_around_an_int8_change, model_of_kind

import gpt2_decl
from gpt2_decl import GPT2, GPT2Config, KVCache
from gpt2_decl.speedups import cpu_decoding, row_kernels
from gpt2_decl.speedups.cpu_decoding import CpuDecoding

CONFIG = GPT2Config(vocab_size=97, n_ctx=32, d_model=48, n_layer=2, n_head=3, init_std=0.2)

pytestmark = pytest.mark.skipif(row_kernels.load() is not None,
                                reason=f"no row kernel here: {row_kernels.load()}")


def sums_tolerance(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Float32 rounding of sums of |x| |w| terms: a few units in the last place of the sum of
    magnitudes, per output."""
    return 1e-6 * (x.double().abs() @ weight.double().abs().T) + 1e-6


# Input rows one at a time and four at a time (and the rest; past four, weight rows go in groups
# of 8, bfloat16 and int8 ones widened to float32 once); weight rows in and past whole blocks of
# 16; columns in and past whole steps (16 float32, 64 bfloat16 as pairs, 64 int8), odd ones too.
SHAPES = [(1, 64, 16), (3, 64, 16), (4, 64, 16), (1, 77, 13), (2, 131, 21), (6, 131, 21),
          (1, 768, 40), (4, 768, 40), (9, 768, 40), (16, 96, 48)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "in_features", "out_features"), SHAPES)
def test_float_products_match_float64(dtype, rows, in_features, out_features):
    generator = torch.Generator().manual_seed(in_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    product = torch.ops.gpt2_decl.row_products(x, weight)
    assert product.dtype == torch.float32 and product.shape == (rows, out_features)
    expected = x.double() @ weight.double().T  # the bfloat16 weights as they are stored
    assert ((product.double() - expected).abs() <= sums_tolerance(x, weight)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "in_features", "out_features"), SHAPES)
def test_int8_products_match_float64_within_their_digits(dtype, rows, in_features,
                                                         out_features):
    # Where the CPU has VNNI, a row meets int8 weights as two int8 digits, which miss at most
    # max|x| / (2 * 127 * 254) of each element; elsewhere the products are float32's.
    generator = torch.Generator().manual_seed(in_features)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    qdata = torch.randint(-128, 128, (out_features, in_features), generator=generator,
                          dtype=torch.int8)
    scale = torch.rand(out_features, generator=generator).to(torch.bfloat16)
    zero_point = torch.randint(-3, 4, (out_features,), generator=generator)
    product = torch.ops.gpt2_decl.int8_row_products(x, qdata, scale, zero_point)
    assert product.dtype == torch.float32 and product.shape == (rows, out_features)
    scales = scale.double()[:, None]
    expected = x.double() @ ((qdata.double() - zero_point.double()[:, None]) * scales).T
    missed = x.double().abs().amax(1, keepdim=True) / (2 * 127 * 254)
    # float32 rounding of x . q and of zero_point * sum(x), and what the digits miss of x . q
    rounding = sums_tolerance(x, (qdata.double().abs() + zero_point.double().abs()[:, None])
                              * scales) * 4
    assert ((product.double() - expected).abs()
            <= rounding + missed * (qdata.double().abs() * scales).sum(1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int8_products_of_a_row_with_nan_or_inf_are_not_finite(dtype, bad):
    # as float products would be (inf times weights of both signs sums to NaN); other rows
    # are untouched
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 128, generator=generator)
    x[0, 70] = bad
    qdata = torch.randint(-128, 128, (20, 128), generator=generator, dtype=torch.int8)
    scale = torch.rand(20, generator=generator)
    zero_point = torch.zeros(20, dtype=torch.int8)
    product = torch.ops.gpt2_decl.int8_row_products(x.to(dtype), qdata, scale, zero_point)
    assert not product[0].isfinite().any()
    expected = x[1:].to(dtype).double() @ (qdata.double() * scale.double()[:, None]).T
    assert (product[1:].double() - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_kernel_linear_keeps_the_input_dtype_and_shape_and_adds_the_bias():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 40, generator=generator).to(torch.bfloat16)
    weight = torch.randn(24, 40, generator=generator).to(torch.bfloat16)
    bias = torch.randn(24, generator=generator).to(torch.bfloat16)
    result = row_kernels.kernel_linear(x, weight, bias)
    assert result.dtype == torch.bfloat16 and result.shape == (2, 1, 24)
    expected = (x.double() @ weight.double().T).to(torch.bfloat16) + bias
    assert torch.equal(result, expected)  # float32 sums round to the same bfloat16 here


@pytest.mark.parametrize(("call", "message"), [
    (lambda: torch.ops.gpt2_decl.row_products(torch.randn(1, 8), torch.randn(4, 8).half()),
     "contiguous float32 or bfloat16 weight [out, 8], got [4, 8] Half"),
    (lambda: torch.ops.gpt2_decl.row_products(torch.randn(1, 8), torch.randn(8, 4).T),
     "contiguous float32 or bfloat16 weight"),
    (lambda: torch.ops.gpt2_decl.row_products(torch.randn(1, 8), torch.randn(4, 9)),
     "weight [out, 8], got [4, 9]"),
    (lambda: torch.ops.gpt2_decl.row_products(torch.ones(1, 8, dtype=torch.long),
                                              torch.randn(4, 8)),
     "rows of floats [rows, in_features], got [1, 8] Long"),
    (lambda: torch.ops.gpt2_decl.int8_row_products(
        torch.randn(1, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(3), torch.zeros(4)),
     "one scale and zero point per row (4), got 3 and 4"),
])
def test_bad_input_is_refused_with_what_was_expected(call, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call()


def decode_step_logits(model: GPT2, step, rows: int) -> torch.Tensor:
    prompt = torch.randint(CONFIG.vocab_size, (rows, 6), generator=torch.Generator().manual_seed(2))
    cache = KVCache(CONFIG, rows, CONFIG.n_ctx, dtype=model.dtype, device=model.device)
    with torch.no_grad():
        model(prompt[:, :-1], cache)
        return step(prompt[:, -1:], cache, check_values=False).double()


def kind_of_model(kind: str) -> GPT2:
    return model_of_kind(CONFIG, kind)


def step_against_eager(model: GPT2, decoding: CpuDecoding, rows: int
                       ) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
    """How many nodes of each kind `decoding` rewrote in the compiled step, and the step's
    logits compiled with it and run eagerly."""
    counts = {}

    def backend(graph_module, example_inputs):
        counts.update(decoding.rewrite(graph_module))
        return decoding.backend(graph_module, example_inputs)

    compiled = decode_step_logits(model, gpt2_decl.compile(model, backend=backend), rows)
    return counts, compiled, decode_step_logits(model, model, rows)


@pytest.fixture
def kernel_inputs(monkeypatch) -> list[torch.Size]:
    """The shape of the input of each product that goes through the kernel (its arguments
    passed by position)."""
    shapes = []
    real = row_kernels.kernel_linear
    monkeypatch.setattr(row_kernels, "kernel_linear",
                        lambda x, *args: shapes.append(x.shape) or real(x, *args))
    return shapes


# One row, and five (four at a time and one): the op tests above cover the other combinations.
@pytest.mark.parametrize(("kind", "rows"), [("float32", 1), ("bfloat16", 5), ("int8", 1),
                                            ("int8", 5)])
def test_step_with_kernel_products_matches_eager(kind, rows):
    counts, compiled, eager = step_against_eager(
        kind_of_model(kind), CpuDecoding(one_row_products=False, kernel_products=True), rows)
    assert counts["kernel_products"] == 4 * CONFIG.n_layer + 1  # every product, the head too
    # float32 sums in another order; bfloat16 and int8 round their outputs to bfloat16/float32
    tolerance = 1e-5 if kind == "float32" else 0.02 * eager.abs().max()
    assert (compiled - eager).abs().max() <= tolerance


def test_a_failed_build_says_why_and_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(row_kernels, "FLAGS", [*row_kernels.FLAGS, "-fno-such-flag"])
    row_kernels.load.cache_clear()
    try:
        reason = row_kernels.load()
    finally:
        row_kernels.load.cache_clear()
    assert reason.startswith("the C++ kernels could not be built or loaded")
    assert list(tmp_path.rglob("*")) == [tmp_path / "gpt2_decl"]  # the folder, left empty


def test_kernel_rewrites_are_left_plain_where_the_kernels_cannot_be_built(monkeypatch):
    monkeypatch.setattr(row_kernels, "load", lambda: "no C++ compiler here")
    model = GPT2(CONFIG).eval()
    counts = {}

    def backend(graph_module, example_inputs):
        counts.update(CpuDecoding(kernel_products=True, kernel_attention=True)
                      .rewrite(graph_module))
        return graph_module.forward

    decode_step_logits(model, torch.compile(model, backend=backend, fullgraph=True), 1)
    # Attention falls back to the other one-query rewrite, asked for too.
    assert counts == {"one_row_products": 4 * CONFIG.n_layer + 1, "kernel_products": 0,
                      "kernel_attention": 0, "one_query_attention": CONFIG.n_layer}


def test_int8_weights_decoded_by_the_kernel_are_frozen_and_never_decoded_stale(monkeypatch):
    monkeypatch.setattr(cpu_decoding, "_choices", {})
    monkeypatch.setattr(cpu_decoding, "_time_products", lambda model, rows: {
        "one_row_products": (2.0, 9.0), "kernel_products": (1.0, 9.0)})
    model = gpt2_decl.quantize(GPT2(CONFIG).eval(), "int8")
    choice = cpu_decoding.choice_for(model)
    assert choice.decoding.kernel_products and choice.decoding.freeze_weights
    change = decode_around_an_int8_change(model)
    assert torch.equal(change.before, change.eager_before)
    # The frozen step holds the old weights: generation compiles one without them.
    assert torch.equal(change.after, change.eager_after)
    assert not torch.equal(change.after, change.before)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
def test_kernel_products_mode_takes_the_products_it_reads_and_matches_them(kernel_inputs,
                                                                            kind):
    model = kind_of_model(kind)
    tokens = torch.randint(CONFIG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        eager = model(tokens).double()
        with row_kernels.KernelProducts(max_rows=14):
            through_kernel = model(tokens).double()
    # Every product of the blocks and the head, each of the 2 x 7 rows at once.
    assert kernel_inputs == [(2, 7, CONFIG.d_model), (2, 7, CONFIG.d_model),
                             (2, 7, CONFIG.d_model), (2, 7, 4 * CONFIG.d_model)
                             ] * CONFIG.n_layer + [(2, 7, CONFIG.d_model)]
    tolerance = 1e-5 if kind == "float32" else 0.02 * eager.abs().max()
    assert (through_kernel - eager).abs().max() <= tolerance


@pytest.mark.parametrize("case", ["more rows", "gradients", "int8 activations", "meta",
                                  "no kernel"])
def test_kernel_products_mode_leaves_what_the_kernel_cannot_do_to_the_model(monkeypatch, case):
    model = kind_of_model("int8-dynamic" if case == "int8 activations" else "float32")
    tokens = torch.randint(CONFIG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    if case == "meta":
        model, tokens = model.to("meta"), tokens.to("meta")
    if case == "no kernel":
        monkeypatch.setattr(row_kernels, "load", lambda: "no C++ compiler here")
    monkeypatch.setattr(row_kernels, "kernel_linear", lambda *args: pytest.fail("taken"))
    with torch.set_grad_enabled(case == "gradients"), \
            row_kernels.KernelProducts(max_rows=13 if case == "more rows" else 14):
        logits = model(tokens, check_values=case != "meta")
    assert logits.shape == (2, 7, CONFIG.vocab_size)
    assert logits.requires_grad == (case == "gradients")


def test_kernel_products_mode_takes_products_with_arguments_passed_by_name(kernel_inputs):
    generator = torch.Generator().manual_seed(6)
    x, weight, bias = (torch.randn(shape, generator=generator) for shape in [(3, 40), (24, 40),
                                                                             (24,)])
    with torch.no_grad(), row_kernels.KernelProducts(max_rows=3):
        by_name = F.linear(input=x, weight=weight, bias=bias)
        mixed = F.linear(x, weight=weight)
    assert kernel_inputs == [(3, 40), (3, 40)]
    assert (by_name - F.linear(x, weight, bias)).abs().max() <= 1e-5
    assert (mixed - F.linear(x, weight)).abs().max() <= 1e-5


def test_generation_runs_the_prompt_through_the_kernel_where_it_timed_faster(monkeypatch,
                                                                            kernel_inputs):
    monkeypatch.setattr(cpu_decoding, "_choices", {})
    monkeypatch.setattr(cpu_decoding, "_time_prefill", lambda model: {
        32: {"kernel": 1.0, "library": 2.0}, 256: {"kernel": 3.0, "library": 2.0}})
    model = GPT2(CONFIG).eval()  # float32: the kernel's sums round as eager's, to 1e-6
    assert cpu_decoding.choice_for(model, rows=2).prefill_rows == 32
    generator = torch.Generator().manual_seed(3)
    for prompt_len in (16, 17):  # 2 x 16 rows, then 2 x 17: more than 32
        prompt = torch.randint(CONFIG.vocab_size, (2, prompt_len), generator=generator)
        kernel_inputs.clear()
        assert torch.equal(model.generate(prompt, 5, greedy=True, compile=True),
                           model.generate(prompt, 5, greedy=True))
        rows = [shape[:-1].numel() for shape in kernel_inputs]
        # Past 32 rows only the output head's product, of the last positions, is few enough.
        assert rows == [2 * prompt_len] * 4 * CONFIG.n_layer * (prompt_len == 16) + [2]


def attention_inputs(dtype: torch.dtype, batch: int, heads: int, keys: int, d_head: int,
                     seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A query per head, keys and values, and a mask showing a random part (about 60%) of the
    keys, the same for every head of a row."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, d_head, generator=generator).to(dtype)
    k, v = (torch.randn(batch, heads, keys, d_head, generator=generator).to(dtype)
            for _ in range(2))
    visible = torch.rand(batch, 1, 1, keys, generator=generator) < 0.6
    return q, k, v, visible


def float64_attention(q, keys, values, visible) -> torch.Tensor:
    """Softmax attention in float64, each row over the positions its mask shows, gathered
    one by one."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            shown = visible[b, min(h, visible.shape[1] - 1), 0].nonzero().flatten()
            k, v = keys[b, h, shown].double(), values[b, h, shown].double()
            weights = (k @ q[b, h, 0].double() / q.shape[-1] ** 0.5).softmax(0)
            out[b, h, 0] = weights @ v
    return out


# Heads of whole vectors (16, 64) and not (24, 8); keys in and past groups of 16; batches.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "heads", "keys", "d_head"), [
    (1, 3, 12, 16), (2, 4, 40, 64), (3, 2, 37, 24), (1, 2, 70, 8), (16, 12, 33, 64)])
def test_kernel_attention_matches_float64_over_the_visible_keys(dtype, batch, heads, keys,
                                                                d_head):
    q, k, v, visible = attention_inputs(dtype, batch, heads, keys, d_head)
    visible[:, :, :, 0] = True  # a key for every row to see
    result = row_kernels.kernel_attention(q, k, v, attn_mask=visible)
    assert result.dtype == dtype and result.shape == q.shape
    expected = float64_attention(q, k, v, visible)
    # float32 sums in another order; bfloat16 output rounded to 8 significant bits.
    tolerance = 1e-6 if dtype == torch.float32 else expected.abs() * 2**-8 + 1e-6
    assert ((result.double() - expected).abs() <= tolerance).all()


@pytest.mark.parametrize("spread", [1e-3, 30.0])
def test_kernel_attention_matches_float64_with_scores_close_or_far_apart(spread):
    # Far apart, most weights fall below float32's normal numbers (e^-87) next to the largest.
    q, k, v, visible = attention_inputs(torch.float32, 2, 3, 48, 64, seed=1)
    q = q * spread
    visible[:, :, :, 0] = True
    result = row_kernels.kernel_attention(q, k, v, attn_mask=visible)
    assert (result.double() - float64_attention(q, k, v, visible)).abs().max() < 1e-6


def test_kernel_attention_never_reads_the_keys_the_mask_hides():
    q, k, v, visible = attention_inputs(torch.float32, 2, 3, 40, 64)
    visible[:, :, :, 0] = True
    result = row_kernels.kernel_attention(q, k, v, attn_mask=visible)
    hidden = ~visible.expand(2, 3, 1, 40).squeeze(2)
    k[hidden], v[hidden] = float("nan"), float("nan")  # read, they would make NaN
    assert torch.equal(row_kernels.kernel_attention(q, k, v, attn_mask=visible), result)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_attention_takes_a_mask_per_head_strided_tensors_and_a_scale(dtype):
    _, k, v, _ = attention_inputs(dtype, 2, 3, 20, 16)
    q = torch.randn(2, 16, 3, 1).to(dtype).permute(0, 2, 3, 1)  # [2, 3, 1, 16], d_head strided
    visible = torch.rand(2, 3, 1, 20, generator=torch.Generator().manual_seed(1)) < 0.5
    visible[..., 3] = True
    # A cache's first 20 positions, of 32: rows 32 positions apart.
    k_cache, v_cache = (torch.zeros(2, 3, 32, 16, dtype=dtype) for _ in range(2))
    k_cache[:, :, :20], v_cache[:, :, :20] = k, v
    result = row_kernels.kernel_attention(q, k_cache[:, :, :20], v_cache[:, :, :20],
                                          attn_mask=visible, scale=0.5)
    assert result.dtype == dtype and result.is_contiguous()
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                              attn_mask=visible, scale=0.5)
    tolerance = 1e-6 if dtype == torch.float32 else expected.abs() * 2**-8 + 1e-6
    assert ((result.double() - expected).abs() <= tolerance).all()


def test_kernel_attention_over_no_visible_key_is_zero_as_sdpa_is():
    q, k, v, visible = attention_inputs(torch.float32, 2, 2, 10, 16)
    visible[0] = False
    visible[1, ..., 2] = True
    result = row_kernels.kernel_attention(q, k, v, attn_mask=visible)
    assert torch.equal(result[0], torch.zeros(2, 1, 16))
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    assert (result - sdpa).abs().max() < 1e-6


@pytest.mark.parametrize(("call", "message"), [
    (lambda: row_kernels.kernel_attention(*attention_inputs(torch.float32, 1, 2, 5, 16)[:3]),
     "kernel attention takes a boolean mask, and no dropout or causal mask"),
    (lambda: torch.ops.gpt2_decl.visible_attention(
        torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16),
        torch.ones(1, 1, 1, 5, dtype=torch.bool), 0.25),
     "one float32 or bfloat16 query a head [batch, heads, 1, d_head], got [1, 2, 3, 16] Float"),
    (lambda: torch.ops.gpt2_decl.visible_attention(
        torch.randn(1, 2, 1, 16), torch.randn(1, 2, 5, 16).half(), torch.randn(1, 2, 5, 16),
        torch.ones(1, 1, 1, 5, dtype=torch.bool), 0.25),
     "keys and values [1, 2, keys, 16] of Float, got [1, 2, 5, 16] Half"),
    (lambda: torch.ops.gpt2_decl.visible_attention(
        torch.randn(1, 2, 1, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16),
        torch.ones(1, 1, 1, 5), 0.25),
     "a boolean mask [batch, 1 or heads, 1, 5], got [1, 1, 1, 5] Float"),
])
def test_bad_attention_input_is_refused_with_what_was_expected(call, message):
    with pytest.raises((RuntimeError, ValueError), match=re.escape(message)):
        call()


@pytest.mark.parametrize(("kind", "rows"), [("float32", 1), ("bfloat16", 3), ("int8", 2)])
def test_step_with_kernel_attention_matches_eager(kind, rows):
    decoding = CpuDecoding(one_row_products=False, one_query_attention=False,
                           kernel_attention=True)
    counts, compiled, eager = step_against_eager(kind_of_model(kind), decoding, rows)
    assert counts["kernel_attention"] == CONFIG.n_layer
    tolerance = 1e-5 if kind == "float32" else 0.02 * eager.abs().max()
    assert (compiled - eager).abs().max() <= tolerance
