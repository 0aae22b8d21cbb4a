import pytest

from gpt2_decl import GPT2Config


@pytest.mark.parametrize(
    ("name", "n_layer", "n_head", "d_model"),
    [
        ("small", 12, 12, 768),
        ("medium", 24, 16, 1024),
        ("large", 36, 20, 1280),
        ("xl", 48, 25, 1600),
    ],
)
def test_presets_have_the_released_sizes(name, n_layer, n_head, d_model):
    config = GPT2Config.from_preset(name)
    assert (config.n_layer, config.n_head, config.d_model) == (n_layer, n_head, d_model)
    assert (config.vocab_size, config.n_ctx, config.layer_norm_eps) == (50257, 1024, 1e-5)
    assert config.d_head == 64 and config.d_mlp == 4 * d_model


def test_preset_overrides_and_unknown_preset():
    assert GPT2Config.from_preset("small", n_ctx=256).n_ctx == 256
    with pytest.raises(ValueError, match="unknown preset 'huge'.*'large'"):
        GPT2Config.from_preset("huge")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(d_model=100, n_head=12), r"d_model \(100\) must be divisible by n_head \(12\)"),
        (dict(n_layer=0), "n_layer must be a positive integer, got 0"),
        (dict(vocab_size=-5), "vocab_size must be a positive integer, got -5"),
        (dict(n_ctx=2.5), "n_ctx must be a positive integer, got 2.5"),
        (dict(n_head=True), "n_head must be a positive integer, got True"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps must be > 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(init_std=-0.02), "init_std must be > 0"),
        (dict(layer_norm_eps="1e-5"), "layer_norm_eps must be a finite number, got '1e-5'"),
        (dict(dropout="0.1"), "dropout must be a finite number, got '0.1'"),
        (dict(init_std=float("inf")), "init_std must be a finite number, got inf"),
        (dict(init_std=float("nan")), "init_std must be a finite number, got nan"),
        (dict(seed=1.5), "seed must be an integer, got 1.5"),
        (dict(seed="0"), "seed must be an integer, got '0'"),
    ],
)
def test_invalid_configs_fail_at_construction(changes, message):
    with pytest.raises(ValueError, match=message):
        GPT2Config(**changes)
