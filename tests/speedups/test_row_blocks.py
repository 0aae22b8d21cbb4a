"""Products made a block of rows at a time: against the float64 product, the backend's rewrite
where timing says so (the fastest block size that beats the whole product) and nowhere else,
and a compiled forward against the longhand model."""

import pytest
import torch
import torch.nn.functional as F

import gpt2_decl
from gpt2_decl import GPT2, GPT2Config
from gpt2_decl.speedups import row_blocks
from gpt2_decl.speedups.quantize import quantize
from gpt2_decl.speedups.row_blocks import RowBlocks, row_blocks_linear
from tests.helpers import reference_logits, rewrites_in_trace

CONFIG = GPT2Config(vocab_size=97, n_ctx=32, d_model=48, n_layer=2, n_head=4, init_std=0.2)
# Each block's four products and the output head.
PRODUCTS = 4 * CONFIG.n_layer + 1


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("block", [4, 5, 26, 40])
def test_the_blocks_make_the_whole_product(with_bias, block):
    generator = torch.Generator().manual_seed(2)
    x, weight, bias = (torch.randn(size, generator=generator, dtype=torch.float64)
                       for size in ((2, 13, 48), (40, 48), (40,)))
    bias = bias if with_bias else None
    result = row_blocks_linear(x, weight, bias, block)
    exact = x @ weight.T + (0 if bias is None else bias)
    assert result.shape == (2, 13, 40) and result.dtype == torch.float64
    assert (result - exact).abs().max() <= 1e-12


@pytest.fixture
def blocks_timed_as(monkeypatch):
    """Blocks of 4 or 8 rows (tiny models have few); set_outcome(ms by block, whole ms) makes
    every timing say so, and returns the list of (rows, in, out, block, dtype, frozen) asked."""
    monkeypatch.setattr(row_blocks, "BLOCK_ROWS", (4, 8))

    def set_outcome(block_ms: dict[int, float], whole_ms: float) -> list:
        asked = []

        def timing(*args):
            asked.append(args)
            return block_ms[args[3]], whole_ms

        monkeypatch.setattr(row_blocks, "time_blocks", timing)
        return asked

    return set_outcome


def blocks_in_trace(model: GPT2, tokens: torch.Tensor) -> list[int]:
    """The block size of each product RowBlocks rewrites in `model`'s traced forward."""
    found = []

    def rewrite(graph_module):
        count = RowBlocks().rewrite(graph_module)
        found.extend(node.args[3] for node in graph_module.graph.nodes
                     if node.target is torch.ops.gpt2_decl.row_blocks_linear.default)
        assert len(found) == count
        return count

    rewrites_in_trace(model, rewrite, tokens)
    return found


def test_products_go_in_the_fastest_block_that_beats_the_whole_product(blocks_timed_as):
    model = GPT2(CONFIG).eval()
    tokens = torch.randint(CONFIG.vocab_size, (2, 9))
    asked = blocks_timed_as({4: 1.5, 8: 1.0}, 2.0)
    with torch.no_grad():
        assert blocks_in_trace(model, tokens) == [8] * PRODUCTS
    d_model, d_mlp = CONFIG.d_model, 4 * CONFIG.d_model
    shapes = {(18, d_model, 3 * d_model), (18, d_model, d_model), (18, d_model, d_mlp),
              (18, d_mlp, d_model), (18, d_model, CONFIG.vocab_size)}
    # Both block sizes make two blocks or more of 18 rows; traced unfrozen.
    assert set(asked) == {(*shape, block, torch.float32, False) for shape in shapes
                          for block in (4, 8)}
    blocks_timed_as({4: 1.0, 8: 3.0}, 2.0)
    with torch.no_grad():
        assert blocks_in_trace(model, tokens) == [4] * PRODUCTS
    blocks_timed_as({4: 3.0, 8: 3.0}, 2.0)
    with torch.no_grad():
        assert blocks_in_trace(model, tokens) == []


def test_only_block_sizes_that_make_two_blocks_are_timed(blocks_timed_as):
    asked = blocks_timed_as({4: 1.0, 8: 1.0}, 2.0)
    with torch.no_grad():
        assert blocks_in_trace(GPT2(CONFIG).eval(), torch.randint(CONFIG.vocab_size, (1, 12))) \
            == [4] * PRODUCTS
    assert {args[3] for args in asked} == {4}
    with torch.no_grad():  # one row: no block of it
        assert blocks_in_trace(GPT2(CONFIG).eval(), torch.tensor([[3]])) == []


def test_products_with_gradients_or_quantized_weights_are_left_alone(blocks_timed_as):
    asked = blocks_timed_as({4: 1.0, 8: 1.0}, 2.0)
    tokens = torch.randint(CONFIG.vocab_size, (2, 9))
    assert blocks_in_trace(GPT2(CONFIG).eval(), tokens) == []  # gradients recorded
    pytest.importorskip("torchao", reason="quantizing needs torchao (the [quantize] extra)")
    with torch.no_grad():
        quantized = quantize(GPT2(CONFIG).eval(), "int8")
        assert blocks_in_trace(quantized, tokens) == []
    assert asked == []


@pytest.mark.parametrize("frozen", [False, True])
def test_timing_is_taken_once_per_shape_and_decides(monkeypatch, frozen):
    monkeypatch.setattr(row_blocks, "_times", {})
    blocks_ms, whole_ms = row_blocks.time_blocks(16, 48, 5000, 4, torch.float32, frozen)
    assert blocks_ms > 0 and whole_ms > 0
    key = (16, 48, row_blocks.TIMED_ROWS, 4, torch.float32, frozen, torch.get_num_threads())
    assert row_blocks.timings() == {key: (blocks_ms, whole_ms)}
    monkeypatch.setattr(row_blocks, "BLOCK_ROWS", (4,))
    row_blocks._times[key] = (whole_ms + 1, whole_ms)  # no second timing: this is used
    assert row_blocks.fastest_block(16, 48, 5000, torch.float32, frozen) is None
    row_blocks._times[key] = (whole_ms, whole_ms + 1)
    assert row_blocks.fastest_block(16, 48, 5000, torch.float32, frozen) == 4
    assert "16x48x4096x4 float32: blocks" in row_blocks.describe()


@pytest.mark.parametrize("freeze", [False, True])
def test_compiled_forward_in_blocks_matches_the_longhand_model(blocks_timed_as, freeze):
    model = GPT2(CONFIG).eval()
    tokens = torch.randint(CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    blocks_timed_as({4: 3.0, 8: 1.0}, 2.0)
    torch._dynamo.reset()
    with torch.no_grad():
        logits = gpt2_decl.compile(model, freeze=freeze, backend=RowBlocks())(tokens)
        exact = reference_logits(_in_float64(model), tokens)
    assert (logits.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


def _in_float64(model: GPT2) -> GPT2:
    wide = GPT2(CONFIG).eval()
    wide.load_state_dict(model.state_dict())
    return wide.double()


def test_the_blocked_product_is_what_f_linear_gives_in_bfloat16():
    generator = torch.Generator().manual_seed(5)
    x, weight, bias = (torch.randn(size, generator=generator).to(torch.bfloat16)
                       for size in ((600, 64), (96, 64), (96,)))
    exact = x.double() @ weight.double().T + bias.double()
    for result in (row_blocks_linear(x, weight, bias, 256), F.linear(x, weight, bias)):
        # Summed in float32, rounded once to bfloat16.
        assert ((result.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-4).all()


@pytest.mark.skipif(not row_blocks.packs(torch.float32), reason="no mkldnn products here")
@pytest.mark.parametrize("with_bias", [True, False])
def test_blocks_through_the_laid_out_weight_make_the_whole_product(with_bias):
    generator = torch.Generator().manual_seed(4)
    x, weight, bias = (torch.randn(size, generator=generator)
                       for size in ((3, 11, 48), (40, 48), (40,)))
    bias = bias if with_bias else None
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    result = row_blocks_linear(x, weight, bias, 4, True)
    assert result.shape == (3, 11, 40)
    assert (result.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    with torch.no_grad():
        weight.mul_(2)  # in place: laid out again, not multiplied as it was
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    assert (row_blocks_linear(x, weight, bias, 4, True).double() - exact).abs().max() \
        <= 1e-5 * exact.abs().max()


def test_frozen_graphs_take_the_laid_out_weight_and_others_the_weight_as_it_is(blocks_timed_as):
    model = GPT2(CONFIG).eval()
    tokens = torch.randint(CONFIG.vocab_size, (2, 9))
    blocks_timed_as({4: 1.0, 8: 2.0}, 3.0)
    packed = []

    def recording(graph_module, example_inputs):
        RowBlocks().rewrite(graph_module)
        packed.extend(node.args[4] for node in graph_module.graph.nodes
                      if node.target is torch.ops.gpt2_decl.row_blocks_linear.default)
        return graph_module.forward

    for freeze in (False, True):
        torch._dynamo.reset()
        with torch.no_grad():
            gpt2_decl.compile(model, freeze=freeze, backend=recording)(tokens)
    assert packed == [False] * PRODUCTS + [row_blocks.packs(torch.float32)] * PRODUCTS
