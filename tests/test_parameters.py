import pytest

from gpt2_decl import GPT2, GPT2Config, count_parameters
from gpt2_decl.cli import main

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
        "block.qkv": 1_771_776,
        "block.attn_out": 590_592,
        "block.ln_2": 1_536,
        "block.mlp_in": 2_362_368,
        "block.mlp_out": 2_360_064,
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
