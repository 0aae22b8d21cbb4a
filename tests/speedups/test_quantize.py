"""Weight-only int8 through torchao: the rounding bound per row, the tied embedding, compiled
decoding (plain, and through a plan's GEMV kernel) giving eager's tokens and seeing weights
changed in place, the agreement measure, and what is refused."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchao", reason="quantizing needs torchao (the [quantize] extra)")

from helpers import decode_around_an_int8_change  # noqa: E402

from gpt2_decl import GPT2, GPT2Config, quantize  # noqa: E402
from gpt2_decl.core.tensors import stored_bytes  # noqa: E402
from gpt2_decl.speedups import gemv  # noqa: E402
from gpt2_decl.speedups.machine import this_machine  # noqa: E402
from gpt2_decl.speedups.plan import Choice, Plan, describe_model  # noqa: E402
from gpt2_decl.speedups.quantize import agreement, int8_rows, is_quantized  # noqa: E402

# Logits spread wide, so that few next-token choices are near-ties that rounding can flip.
CONFIG = GPT2Config(vocab_size=97, n_ctx=48, d_model=64, n_layer=2, n_head=4, init_std=0.2,
                    seed=7)
MATRICES = ["blocks.0.attn.qkv.weight", "blocks.1.mlp.down.weight", "lm_head.weight"]


def float_and_int8(dtype=torch.float32):
    original = GPT2(CONFIG).to(dtype).eval()
    quantized = GPT2(CONFIG).to(dtype).eval()
    return original, quantize(quantized)


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
    assert stored_bytes(quantized.lm_head.weight) == n + CONFIG.vocab_size * (4 + 1)
    assert stored_bytes(original.lm_head.weight) == 4 * n


def test_quantized_logits_stay_close_and_agree_on_the_next_token():
    original, quantized = float_and_int8()
    tokens = torch.randint(CONFIG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, produced = original(tokens), quantized(tokens)
    assert (produced - expected).abs().max() < 0.05 * expected.abs().max()
    assert (produced.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_compiled_decoding_gives_eager_tokens_and_sees_weights_changed_in_place():
    _, quantized = float_and_int8()
    change = decode_around_an_int8_change(quantized)
    assert torch.equal(change.before, change.eager_before)
    assert torch.equal(change.after, change.eager_after)
    assert not torch.equal(change.after, change.before)


@pytest.mark.skipif(gemv.unavailable_reason() is not None, reason=f"{gemv.unavailable_reason()}")
def test_a_plan_decodes_int8_rows_and_prompts_through_the_kernel_as_eager_does():
    _, quantized = float_and_int8()
    choices = tuple(Choice(name, name in ("gemv_kernel", "gemv_prompt")) for name in
                    ("gemm_template", "gemv_kernel", "upcast_attention", "upcast_prompt",
                     "gemv_prompt"))
    plan = Plan(describe_model(quantized), 1, 6, this_machine(), choices)
    prompt = torch.randint(CONFIG.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    assert torch.equal(quantized.generate(prompt, 12, greedy=True, plan=plan),
                       quantized.generate(prompt, 12, greedy=True))


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


def test_what_quantizing_refuses(tmp_path):
    model = GPT2(CONFIG)
    with pytest.raises(ValueError, match="^unknown quantization 'int3'; expected one of int8$"):
        quantize(model.eval(), "int3")
    with pytest.raises(ValueError, match="for inference, not training"):
        quantize(model.train())
    quantize(model.eval())
    with pytest.raises(ValueError, match="quantized already"):
        quantize(model, "int8")
    with pytest.raises(ValueError, match="^a quantized model is not saved: save the float"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    pytest.importorskip("gguf")
    with pytest.raises(ValueError, match="^a quantized model is not saved"):
        model.save_gguf(tmp_path / "model.gguf")
