import pytest

from gpt2_decl import GPT2, GPT2Config, count_parameters
from gpt2_decl.cli import main
from gpt2_decl.core.counting import forward_flops, forward_flops_per_token, training_flops_per_token

# From the GPT-2 release (see shared notes): tied count, and the untied count a module walk gives.
REFERENCE_COUNTS = {
    "small": (124_439_808, 163_037_184),
    "medium": (354_823_168, 406_286_336),
    "large": (774_030_080, 838_359_040),
    "xl": (1_557_611_200, 1_638_022_400),
}


@pytest.mark.parametrize("preset", sorted(REFERENCE_COUNTS))
def test_exact_counts_for_every_preset(preset):
    counts = count_parameters(GPT2Config.from_preset(preset))
    assert (counts.tied, counts.untied) == REFERENCE_COUNTS[preset]


def test_small_breakdown_by_part():
    counts = count_parameters(GPT2Config.from_preset("small"))
    assert counts.parts == {
        "token_embedding": 38_597_376,
        "position_embedding": 786_432,
        "block.ln_1": 1_536,
        "block.attn.qkv": 1_771_776,
        "block.attn.proj": 590_592,
        "block.ln_2": 1_536,
        "block.mlp.up": 2_362_368,
        "block.mlp.down": 2_360_064,
        "ln_f": 1_536,
        "lm_head (tied to token_embedding)": 38_597_376,
    }
    assert counts.per_block == 7_087_872
    assert counts.without_position_embedding == 124_439_808 - 786_432


def test_counts_of_a_real_model_match_the_meta_count(tiny_config):
    model = GPT2(tiny_config)
    assert count_parameters(model) == count_parameters(tiny_config)
    # named_parameters() de-duplicates the tied matrix; state_dict() lists both names.
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model).tied
    state_total = sum(t.numel() for t in model.state_dict().values())
    assert state_total == count_parameters(model).untied


def test_summary_command_explains_tied_vs_untied(capsys):
    main(["summary", "--preset", "small"])
    out = capsys.readouterr().out
    assert "124,439,808" in out and "163,037,184" in out
    assert "163.04M - 38.60M = 124.44M" in out


# A tiny model with every parameter counted by hand (d_model 64, 4 heads, 2 layers, vocab 100).
TINY_BLOCK = (
    2 * 64  # ln_1
    + 64 * 192 + 192  # fused qkv
    + 64 * 64 + 64  # attention out
    + 2 * 64  # ln_2
    + 64 * 256 + 256  # mlp up
    + 256 * 64 + 64  # mlp down
)
TINY_WITHOUT_POSITIONS = 100 * 64 + 2 * TINY_BLOCK + 2 * 64  # token embedding, blocks, ln_f


def test_flops_per_token_of_gpt2_small_at_full_context_match_the_reference_figure():
    # From the GPT-2 reference notes: 285,055,488 FLOP per token at T = 1024.
    assert forward_flops_per_token(GPT2Config.from_preset("small"), 1024) == 285_055_488
    # And "a batch of 8x1024 is about 2.34 TFLOP".
    flops = forward_flops(GPT2Config.from_preset("small"), batch=8, seq=1024)
    assert flops == pytest.approx(2.34e12, rel=0.005)


def test_flops_of_a_tiny_forward_pass_counted_by_hand():
    config = GPT2Config(vocab_size=100, n_ctx=32, d_model=64, n_layer=2, n_head=4)
    assert count_parameters(config).without_position_embedding == TINY_WITHOUT_POSITIONS
    # 2 FLOPs per parameter, and 4 T d_model per layer for attention's two products.
    per_token = 2 * TINY_WITHOUT_POSITIONS + 4 * 2 * 16 * 64
    assert forward_flops_per_token(config, 16) == per_token
    assert forward_flops(config, batch=3, seq=16) == 3 * 16 * per_token
    assert training_flops_per_token(config, 16) == 3 * per_token
