"""int8 through torchao: the rounding bound per row, the tied embedding, the compiled CPU step
reading int8 rows, int8 activations ("int8-dynamic") against integer sums by hand and in a
frozen compiled step, the agreement measure, and what is refused."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchao", reason="quantizing needs torchao (the [quantize] extra)")

from helpers import decode_around_an_int8_change  # noqa: E402

import gpt2_decl  # noqa: E402
from gpt2_decl import GPT2, GPT2Config, quantize  # noqa: E402
from gpt2_decl.speedups.cpu_decoding import CpuDecoding, one_row_linear  # noqa: E402
from gpt2_decl.speedups.quantize import (  # noqa: E402
    agreement,
    int8_rows,
    is_quantized,
    parameter_bytes,
)

# Logits spread wide, so that few next-token choices are near-ties that rounding can flip.
CONFIG = GPT2Config(vocab_size=97, n_ctx=48, d_model=64, n_layer=2, n_head=4, init_std=0.2,
                    seed=7)
MATRICES = ["blocks.0.attn.qkv.weight", "blocks.1.mlp.down.weight", "lm_head.weight"]


def float_and_int8(dtype=torch.float32, scheme="int8"):
    original = GPT2(CONFIG).to(dtype).eval()
    quantized = GPT2(CONFIG).to(dtype).eval()
    return original, quantize(quantized, scheme)


@pytest.mark.parametrize("name", MATRICES)
def test_each_row_is_rounded_to_int8_within_half_a_step(name):
    original, quantized = float_and_int8()
    weight = original.get_parameter(name).detach()
    qdata, scale, zero_point = int8_rows(quantized.get_parameter(name))
    assert qdata.dtype == torch.int8 and qdata.shape == weight.shape
    # A symmetric scale per output row: 255 steps span the row's largest magnitude both ways.
    largest = weight.abs().amax(dim=1, keepdim=True)
    assert torch.allclose(scale, largest / 127.5, rtol=1e-2)
    dequantized = (qdata.float() - zero_point.float()) * scale
    assert ((dequantized - weight).abs() <= scale / 2 + 1e-7).all()


def test_the_input_embedding_stays_float_while_the_head_gets_int8():
    original, quantized = float_and_int8()
    embedding = quantized.token_embedding.weight
    assert type(embedding) is torch.nn.Parameter and int8_rows(embedding) is None
    assert torch.equal(embedding, original.token_embedding.weight)
    assert int8_rows(quantized.lm_head.weight) is not None
    assert is_quantized(quantized) and not is_quantized(original)
    n = CONFIG.vocab_size * CONFIG.d_model
    assert parameter_bytes(quantized.lm_head.weight) == n + CONFIG.vocab_size * (4 + 1)
    assert parameter_bytes(original.lm_head.weight) == 4 * n


def test_quantized_logits_stay_close_and_agree_on_the_next_token():
    original, quantized = float_and_int8()
    tokens = torch.randint(CONFIG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, produced = original(tokens), quantized(tokens)
    assert (produced - expected).abs().max() < 0.05 * expected.abs().max()
    assert (produced.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_the_one_row_product_equals_torchaos_own_int8_product():
    _, quantized = float_and_int8()
    weight, bias = quantized.blocks[0].mlp.up.weight, quantized.blocks[0].mlp.up.bias
    x = torch.randn(1, 1, CONFIG.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (one_row_linear(x, weight, bias) - F.linear(x, weight, bias)).abs().max() < 1e-5


def test_compiled_cpu_decoding_of_int8_gives_the_eager_tokens_and_streams_int8(monkeypatch):
    import gpt2_decl.speedups.cpu_decoding as cpu_decoding

    read = []  # what the rewritten products found in their weights while being traced
    monkeypatch.setattr(cpu_decoding, "int8_rows",
                        lambda weight: read.append(int8_rows(weight)) or read[-1])
    _, quantized = float_and_int8()
    prompt = torch.randint(CONFIG.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    eager = quantized.generate(prompt, 20, greedy=True)
    counts = []
    rewriting = CpuDecoding()
    original_rewrite = rewriting.rewrite

    def counting(graph_module):
        counts.append(original_rewrite(graph_module))
        return counts[-1]

    object.__setattr__(rewriting, "rewrite", counting)
    compiled = quantized.generate(prompt, 20, greedy=True, compile=rewriting.backend)
    assert torch.equal(compiled, eager)
    # Every product of the one-token step: qkv, proj, up, down per block, and the head,
    # each read as int8 rows.
    assert max(count["one_row_products"] for count in counts) == 4 * CONFIG.n_layer + 1
    assert len(read) >= 4 * CONFIG.n_layer + 1 and all(rows is not None for rows in read)


def test_agreement_against_hand_counted_predictions():
    original, quantized = float_and_int8()
    tokens = torch.randint(CONFIG.vocab_size, (3, 17), generator=torch.Generator().manual_seed(3))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        expected, produced = original(inputs), quantized(inputs)
    result = agreement(original, quantized, iter([(inputs, targets)]))
    assert result.tokens == targets.numel()
    same_top1 = (expected.argmax(-1) == produced.argmax(-1)).double().mean().item()
    assert result.top1 == pytest.approx(same_top1)
    loss = F.cross_entropy(produced.flatten(0, 1), targets.flatten()).item()
    assert result.loss == pytest.approx(loss, rel=1e-5)
    same = agreement(original, original, iter([(inputs, targets)]))
    assert same.top1 == 1.0 and same.loss_increase == 0.0


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic"])
def test_what_quantizing_refuses(tmp_path, scheme):
    model = GPT2(CONFIG)
    with pytest.raises(ValueError, match="^unknown quantization 'int3'; expected one of int8, "
                                         "int8-dynamic$"):
        quantize(model.eval(), "int3")
    with pytest.raises(ValueError, match="for inference, not training"):
        quantize(model.train(), scheme)
    quantize(model.eval(), scheme)
    with pytest.raises(ValueError, match="quantized already"):
        quantize(model, "int8")
    with pytest.raises(ValueError, match="^a quantized model is not saved: save the float"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    pytest.importorskip("gguf")
    with pytest.raises(ValueError, match="^a quantized model is not saved"):
        model.save_gguf(tmp_path / "model.gguf")


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic"])
def test_huge_pages_take_quantized_weights_int8_rows_and_all(scheme):
    from gpt2_decl.speedups import huge_pages

    if not huge_pages.available():
        pytest.skip("no transparent huge pages on this system")
    _, quantized = float_and_int8(scheme=scheme)
    rows = {name: [tensor.clone() for tensor in int8_rows(quantized.get_parameter(name))]
            for name in MATRICES}
    tokens = torch.randint(CONFIG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = quantized(tokens)
    assert huge_pages.move_parameters(quantized)
    assert not huge_pages.move_parameters(quantized)  # there already
    moved = huge_pages._moved[quantized]
    for name in MATRICES:
        inner = int8_rows(quantized.get_parameter(name))
        assert inner is not None and inner[0].dtype == torch.int8  # still int8, not dequantized
        for tensor, kept in zip(inner, rows[name], strict=True):
            assert tensor.data_ptr() in moved and torch.equal(tensor, kept)
    with torch.no_grad():
        assert torch.equal(quantized(tokens), before)


def integer_product_by_hand(x, qdata, scale, bias):
    """Each row of x rounded to int8 at max |row| / 127.5 (symmetric; the division in float32,
    as x is), summed with the int8 weight rows exactly in float64, then scaled."""
    rows = x.float().reshape(-1, x.shape[-1])
    row_scales = rows.abs().amax(-1, keepdim=True) / 127.5
    steps = (rows * (1.0 / row_scales)).round().clamp(-128, 127).double()
    sums = steps @ qdata.double().T  # exact: integers well below 2**53
    return (sums * row_scales.double() * scale.double().reshape(1, -1)
            + bias.double()).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("name", ["blocks.0.attn.qkv", "blocks.1.mlp.down", "lm_head"])
def test_int8_dynamic_products_are_integer_sums_of_rounded_rows(name):
    _, quantized = float_and_int8(scheme="int8-dynamic")
    layer = quantized.get_submodule(name)
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(4))
    qdata, scale, _ = int8_rows(layer.weight)
    with torch.no_grad():
        expected = integer_product_by_hand(x, qdata, scale, bias)
        produced = layer(x).double()
    assert (produced - expected).abs().max() < 1e-5 * expected.abs().max()
    # Not weight-only: the rounded input moves the result further than float32 rounding would.
    weight_only = F.linear(x.double(), (qdata.double() * scale.double()), bias.double())
    assert (produced - weight_only).abs().max() > 1e-4 * expected.abs().max()


def test_compiled_cpu_decoding_of_int8_dynamic_freezes_weights_and_keeps_integer_products():
    from gpt2_decl.speedups import cpu_decoding

    _, quantized = float_and_int8(scheme="int8-dynamic")
    choice = cpu_decoding.choice_for(quantized)
    assert choice.decoding.freeze_weights and not choice.decoding.one_row_products
    assert "one_row_products" not in choice.times_ms
    prompt = torch.randint(CONFIG.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    compiled = quantized.generate(prompt, 12, greedy=True, compile=True)
    with torch.no_grad():
        logits = quantized(compiled[:, :-1])[0, prompt.shape[1] - 1:]
    chosen = logits.gather(-1, compiled[0, prompt.shape[1]:, None])[:, 0]
    best = logits.max(-1).values
    # Each token is eager's choice, or a near-tie that one input rounded to the next int8
    # step can flip (logits here spread over several units).
    assert (chosen >= best - 0.05).all()
    assert (chosen == best).float().mean() >= 0.75


@pytest.mark.parametrize("freeze", [False, True])
def test_a_compiled_int8_dynamic_model_gives_eager_logits_for_one_token(freeze):
    # One row is where inductor hands the integer product a row stride of 0.
    _, quantized = float_and_int8(scheme="int8-dynamic")
    token = torch.tensor([[5]])
    with torch.no_grad():
        compiled = gpt2_decl.compile(quantized, freeze=freeze)(token)
        torch.testing.assert_close(compiled, quantized(token), atol=1e-5, rtol=0)


def test_int8_dynamic_weights_changed_in_place_are_not_decoded_stale():
    _, quantized = float_and_int8(scheme="int8-dynamic")
    # The frozen step would decode with the old weights: generation compiles it unfrozen.
    change = decode_around_an_int8_change(quantized)
    assert torch.equal(change.after, change.eager_after)
    assert not torch.equal(change.after, change.before)
