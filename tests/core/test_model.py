import math

import pytest
import torch
from helpers import reference_logits

from gpt2_decl import GPT2, GPT2Config, default_device, typechecked


def test_logits_shape_and_dtype(tiny_model, tokens, tiny_config):
    logits = tiny_model(tokens)
    assert logits.shape == (3, 11, tiny_config.vocab_size)
    assert logits.dtype == torch.float32


def test_matches_a_longhand_reference(tiny_model, tokens):
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_model(tokens), reference_logits(tiny_model, tokens), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("typecheck", [False, True])
def test_last_only_gives_the_last_positions_logits(tiny_model, tokens, typecheck):
    with torch.no_grad(), typechecked(typecheck):
        last = tiny_model(tokens, last_only=True)
    assert last.shape == (3, 1, tiny_model.config.vocab_size)
    with torch.no_grad():
        expected = reference_logits(tiny_model, tokens)[:, -1:]
    torch.testing.assert_close(last, expected, atol=1e-5, rtol=1e-5)


def test_causal_later_tokens_never_change_earlier_logits(tiny_model, tokens, tiny_config):
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % tiny_config.vocab_size
    before, after = tiny_model(tokens), tiny_model(changed)
    torch.testing.assert_close(before[:, :6], after[:, :6], rtol=0, atol=0)
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_output_head_shares_storage_with_the_token_embedding(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.token_embedding.weight
    state = tiny_model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["token_embedding.weight"].data_ptr()


def test_same_seed_same_weights_other_seed_other_weights(tiny_config):
    first, second = GPT2(tiny_config), GPT2(tiny_config)
    other = GPT2(tiny_config.replace(seed=tiny_config.seed + 1))
    for (name, a), b, c in zip(
        first.state_dict().items(),
        second.state_dict().values(),
        other.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name
        if a.std() > 0:
            assert not torch.equal(a, c), name


def test_gpt2_initialisation_statistics():
    config = GPT2Config(vocab_size=512, n_ctx=64, d_model=256, n_layer=8, n_head=4)
    model = GPT2(config)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    block = model.blocks[3]
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert block.mlp.down.weight.std().item() == pytest.approx(residual_std, rel=0.02)
    assert block.attn.proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.equal(block.ln_1.weight, torch.ones(256)) and torch.equal(
        block.attn.qkv.bias, torch.zeros(768)
    )


def test_dropout_only_in_training(tokens):
    model = GPT2(GPT2Config(vocab_size=97, n_ctx=32, d_model=48, n_layer=2, n_head=4, dropout=0.5))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


def test_runs_on_the_meta_device_with_shapes_only(tiny_model, tokens):
    # The positions and the mask follow the tokens' device; nothing reads a value.
    meta_model = GPT2(tiny_model.config).to("meta")
    logits = meta_model(tokens.to("meta"))
    assert logits.device.type == "meta" and logits.shape == (3, 11, tiny_model.config.vocab_size)


def test_default_device_is_available():
    device = default_device()
    assert torch.empty(1, device=device).device.type == device.type


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        ([[1, 2, 3]], TypeError, "must be a torch.Tensor of token ids, got list"),
        (torch.zeros(2, 4), TypeError, "integer dtype.*got torch.float32"),
        (torch.zeros(2, 4, dtype=torch.bool), TypeError, "integer dtype.*got torch.bool"),
        (torch.zeros(4, dtype=torch.long), ValueError, r"shape \[batch, seq\].*got 1 dimensions"),
        (
            torch.zeros(1, 2, 4, dtype=torch.long),
            ValueError,
            r"got 3 dimensions with shape \(1, 2, 4\)",
        ),
        (torch.zeros(2, 0, dtype=torch.long), ValueError, r"must not be empty, got shape \(2, 0\)"),
        (torch.zeros(0, 5, dtype=torch.long), ValueError, "must not be empty"),
        (
            torch.zeros(1, 33, dtype=torch.long),
            ValueError,
            "33 tokens is longer than the context of 32",
        ),
        (torch.full((1, 4), 97), ValueError, r"token id 97 is outside the vocabulary \[0, 97\)"),
        (torch.full((1, 4), -1), ValueError, r"token id -1 is outside the vocabulary"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny_model, bad, error, message):
    with pytest.raises(error, match=message):
        tiny_model(bad)


def test_tokens_on_another_device_name_both_devices(tiny_model):
    meta_tokens = torch.zeros(1, 4, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="tokens are on meta but the model is on cpu"):
        tiny_model(meta_tokens)


def test_int32_ids_are_accepted(tiny_model, tokens):
    torch.testing.assert_close(tiny_model(tokens.int()), tiny_model(tokens))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.uint16])
def test_narrow_integer_ids_are_widened(tiny_model, tokens, dtype):
    torch.testing.assert_close(tiny_model(tokens.to(dtype)), tiny_model(tokens), rtol=0, atol=0)
