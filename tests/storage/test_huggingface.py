"""Checkpoints: parity with the reference implementation (transformers) both ways, and errors."""

import json
import os
import pathlib
import shutil
import signal

import pytest
import safetensors
import safetensors.torch
import torch

import gpt2_decl
from gpt2_decl import GPT2, GPT2Config
from gpt2_decl import compile as compile_model
from gpt2_decl.storage import atomic
from gpt2_decl.storage.huggingface import CheckpointError, CheckpointNotFoundError

transformers = pytest.importorskip("transformers")

# The bound for fp32 logits against transformers.
PARITY_ATOL = 1e-4

# Not only GPT-2's sizes: vocabularies, contexts, head counts, depths and epsilons vary.
HF_CONFIGS = {
    "one-layer-two-heads": dict(vocab_size=101, n_positions=24, n_embd=32, n_layer=1, n_head=2),
    "three-layers-six-heads": dict(vocab_size=257, n_positions=40, n_embd=48, n_layer=3, n_head=6),
    "one-head-eps-1e-3": dict(
        vocab_size=300, n_positions=32, n_embd=64, n_layer=2, n_head=1, layer_norm_epsilon=1e-3,
        activation_function="gelu_pytorch_tanh",
    ),
    "sixteen-heads-of-4": dict(vocab_size=64, n_positions=16, n_embd=64, n_layer=2, n_head=16),
}


def hf_config(**fields) -> "transformers.GPT2Config":
    # No bos/eos: GPT-2's 50256 lies outside these small vocabularies.
    return transformers.GPT2Config(bos_token_id=None, eos_token_id=None, **fields)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`model` with every parameter random: HF initialises biases to 0 and LayerNorms to (1, 0),
    which would hide a misplaced bias or LayerNorm."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = 0.1 * torch.randn(parameter.shape, generator=generator)
            is_norm_scale = parameter.ndim == 1 and "ln_" in name and name.endswith("weight")
            parameter.copy_(noise + (1.0 if is_norm_scale else 0.0))
    return model.eval()


def random_hf_model(seed: int = 0, **fields) -> "transformers.GPT2LMHeadModel":
    return randomized(transformers.GPT2LMHeadModel(hf_config(**fields)), seed)


def random_tokens(vocab_size: int, seq: int, batch: int = 2) -> torch.Tensor:
    tokens = torch.randint(vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    tokens[0, -1] = vocab_size - 1  # the last embedding row is read too
    return tokens


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def small_hf_checkpoint(tmp_path_factory):
    """A saved random HF model, reused by the tests that only need some valid checkpoint."""
    directory = tmp_path_factory.mktemp("hf")
    model = random_hf_model(**HF_CONFIGS["three-layers-six-heads"])
    model.save_pretrained(directory)
    return directory, model


# --- transformers -> gpt2_decl -------------------------------------------------------------


@pytest.mark.parametrize("typecheck", [False, True], ids=["eager", "typechecked"])
@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_hf_checkpoint_gives_the_reference_logits(tmp_path, name, typecheck):
    fields = HF_CONFIGS[name]
    reference = random_hf_model(**fields)
    reference.save_pretrained(tmp_path)
    tokens = random_tokens(fields["vocab_size"], fields["n_positions"])

    model = GPT2.from_pretrained(tmp_path)
    eager_attention = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    with torch.no_grad(), gpt2_decl.typechecked(typecheck):
        ours = model(tokens)
        expected = reference(tokens).logits
        expected_eager_attention = eager_attention(tokens).logits
    diff = max_abs_diff(ours, expected)
    diff_eager = max_abs_diff(ours, expected_eager_attention)
    print(f"{name}: max |logit diff| {diff:.2e} (HF sdpa), {diff_eager:.2e} (HF eager); "
          f"max |logit| {expected.abs().max():.1f}")
    assert diff <= PARITY_ATOL
    assert diff_eager <= PARITY_ATOL

    assert not model.training  # HF configs have dropout 0.1: inference needs eval mode
    expected_config = GPT2Config(
        vocab_size=fields["vocab_size"], n_ctx=fields["n_positions"], d_model=fields["n_embd"],
        n_layer=fields["n_layer"], n_head=fields["n_head"],
        layer_norm_eps=fields.get("layer_norm_epsilon", 1e-5), dropout=0.1,
    )
    assert model.config == expected_config
    assert model.lm_head.weight is model.token_embedding.weight


@pytest.mark.slow
def test_compiled_model_from_hf_checkpoint_gives_the_reference_logits(small_hf_checkpoint):
    directory, reference = small_hf_checkpoint
    config = reference.config
    tokens = random_tokens(config.vocab_size, config.n_positions)
    torch._dynamo.reset()
    compiled = compile_model(GPT2.from_pretrained(directory))
    with torch.no_grad():
        expected = reference(tokens).logits
        diff = max_abs_diff(compiled(tokens), expected)
        with gpt2_decl.typechecked():
            diff_typechecked = max_abs_diff(compiled(tokens), expected)
    torch._dynamo.reset()
    print(f"compiled: max |logit diff| {diff:.2e}, typechecked {diff_typechecked:.2e}")
    assert diff <= PARITY_ATOL
    assert diff_typechecked <= PARITY_ATOL


def test_pytorch_bin_with_old_buffers_and_no_prefix_loads(tmp_path):
    """The layout of the original release: no "transformer." prefix, attention buffers,
    `pytorch_model.bin`, lm_head.weight present (the same tensor as wte)."""
    fields = HF_CONFIGS["one-layer-two-heads"]
    reference = random_hf_model(**fields)
    reference.config.save_pretrained(tmp_path)
    n_ctx = fields["n_positions"]
    state = {key.removeprefix("transformer."): t for key, t in reference.state_dict().items()}
    assert "lm_head.weight" in state
    causal_mask = torch.tril(torch.ones(n_ctx, n_ctx, dtype=torch.bool))[None, None]
    for block in range(fields["n_layer"]):
        state[f"h.{block}.attn.bias"] = causal_mask
        state[f"h.{block}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")

    tokens = random_tokens(fields["vocab_size"], n_ctx)
    with torch.no_grad():
        diff = max_abs_diff(GPT2.from_pretrained(tmp_path)(tokens), reference(tokens).logits)
    assert diff <= PARITY_ATOL


def test_sharded_safetensors_load(tmp_path):
    fields = HF_CONFIGS["one-layer-two-heads"]
    reference = random_hf_model(**fields)
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    tokens = random_tokens(fields["vocab_size"], fields["n_positions"])
    with torch.no_grad():
        diff = max_abs_diff(GPT2.from_pretrained(tmp_path)(tokens), reference(tokens).logits)
    assert diff <= PARITY_ATOL


def test_single_file_with_config_loads_in_the_asked_dtype(small_hf_checkpoint):
    directory, reference = small_hf_checkpoint
    config = GPT2Config(vocab_size=257, n_ctx=40, d_model=48, n_layer=3, n_head=6)
    model = GPT2.from_pretrained(
        directory / "model.safetensors", config=config, dtype=torch.bfloat16, device="cpu"
    )
    assert model.config == config
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.device == torch.device("cpu")
    assert model.lm_head.weight is model.token_embedding.weight
    assert all(p.requires_grad for p in model.parameters())
    expected_qkv = reference.transformer.h[2].attn.c_attn.weight.t().to(torch.bfloat16)
    assert torch.equal(model.blocks[2].attn.qkv.weight, expected_qkv)


# --- gpt2_decl -> transformers and gpt2_decl -----------------------------------------------


def test_saved_model_loads_in_transformers_with_the_same_logits(tmp_path):
    config = GPT2Config(vocab_size=211, n_ctx=24, d_model=32, n_layer=2, n_head=4, dropout=0.2)
    model = randomized(GPT2(config), seed=3)
    model.save_pretrained(tmp_path)

    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    hf_fields = json.loads((tmp_path / "config.json").read_text())
    assert hf_fields["model_type"] == "gpt2"
    assert hf_fields["architectures"] == ["GPT2LMHeadModel"]
    assert hf_fields["activation_function"] == "gelu_new"
    assert hf_fields["resid_pdrop"] == hf_fields["embd_pdrop"] == hf_fields["attn_pdrop"] == 0.2

    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert reference.config.n_layer == 2 and reference.config.n_positions == 24
    tokens = random_tokens(config.vocab_size, config.n_ctx)
    with torch.no_grad():
        diff = max_abs_diff(model(tokens), reference(tokens).logits)
    print(f"gpt2_decl -> transformers: max |logit diff| {diff:.2e}")
    assert diff <= PARITY_ATOL

    reloaded = GPT2.from_pretrained(tmp_path)
    assert reloaded.config == config
    for (name, ours), (_, theirs) in zip(
        model.state_dict().items(), reloaded.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod."])
def test_state_dicts_of_compiled_or_wrapped_models_load(tmp_path, prefix):
    config = GPT2Config(vocab_size=50, n_ctx=8, d_model=16, n_layer=2, n_head=2)
    model = randomized(GPT2(config), seed=4)
    state = torch.compile(model).state_dict()
    assert all(key.startswith("_orig_mod.") for key in state)
    state = {prefix + key.removeprefix("_orig_mod."): value for key, value in state.items()}
    torch.save(state, tmp_path / "weights.pt")

    loaded = GPT2.from_pretrained(tmp_path / "weights.pt", config=config)
    for name, parameter in model.named_parameters():
        assert torch.equal(loaded.get_parameter(name), parameter), name


def test_state_dict_of_compiled_hf_model_loads(tmp_path, small_hf_checkpoint):
    directory, reference = small_hf_checkpoint
    state = {"_orig_mod." + key: value for key, value in reference.state_dict().items()}
    safetensors.torch.save_file(
        {key: value for key, value in state.items() if "lm_head" not in key},
        tmp_path / "model.safetensors",
    )
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    loaded = GPT2.from_pretrained(tmp_path)
    expected = reference.transformer.h[1].mlp.c_proj.weight.t()
    assert torch.equal(loaded.blocks[1].mlp.down.weight, expected)


def test_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    config = GPT2Config(vocab_size=50, n_ctx=8, d_model=16, n_layer=1, n_head=2)
    GPT2(config).save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def crash_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        GPT2(config.replace(seed=5)).save_pretrained(tmp_path)
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert after == before


# --- errors --------------------------------------------------------------------------------


def copy_checkpoint(source, destination, edit_tensors=None, edit_config=None):
    """`source`'s checkpoint written to `destination`, its tensors and config dict edited."""
    tensors = safetensors.torch.load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    safetensors.torch.save_file(tensors, destination / "model.safetensors")
    (destination / "config.json").write_text(json.dumps(config))
    return destination


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(CheckpointNotFoundError, match="no-such-checkpoint"):
        GPT2.from_pretrained(missing)
    with pytest.raises(FileNotFoundError):
        GPT2.from_pretrained(missing)


def test_directory_without_weights_says_what_it_looked_for(tmp_path, small_hf_checkpoint):
    (tmp_path / "config.json").write_bytes((small_hf_checkpoint[0] / "config.json").read_bytes())
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors.*pytorch_model.bin"):
        GPT2.from_pretrained(tmp_path)


def test_single_file_without_config_asks_for_one(small_hf_checkpoint):
    with pytest.raises(CheckpointError, match="config=GPT2Config"):
        GPT2.from_pretrained(small_hf_checkpoint[0] / "model.safetensors")


def test_missing_and_unexpected_keys_are_listed(tmp_path, small_hf_checkpoint):
    def edit(tensors):
        del tensors["transformer.h.1.mlp.c_fc.bias"]
        del tensors["transformer.ln_f.weight"]
        tensors["transformer.h.1.mlp.gate.weight"] = torch.zeros(3)

    copy_checkpoint(small_hf_checkpoint[0], tmp_path, edit_tensors=edit)
    with pytest.raises(CheckpointError) as error:
        GPT2.from_pretrained(tmp_path)
    message = str(error.value)
    assert "missing keys (2)" in message
    assert "h.1.mlp.c_fc.bias" in message and "ln_f.weight" in message
    assert "unexpected keys (1): transformer.h.1.mlp.gate.weight" in message


def test_shape_mismatch_names_key_and_both_shapes(small_hf_checkpoint):
    directory, _ = small_hf_checkpoint
    config = GPT2Config(vocab_size=250, n_ctx=40, d_model=48, n_layer=3, n_head=6)
    expected = r"transformer.wte.weight: expected \(250, 48\), found \(257, 48\)"
    with pytest.raises(CheckpointError, match=expected):
        GPT2.from_pretrained(directory / "model.safetensors", config=config)


def test_shape_mismatch_is_reported_in_the_files_layout(tmp_path, small_hf_checkpoint):
    def edit(tensors):
        key = "transformer.h.0.mlp.c_fc.weight"
        tensors[key] = tensors[key].t().contiguous()

    copy_checkpoint(small_hf_checkpoint[0], tmp_path, edit_tensors=edit)
    expected = r"h.0.mlp.c_fc.weight: expected \(48, 192\), found \(192, 48\)"
    with pytest.raises(CheckpointError, match=expected):
        GPT2.from_pretrained(tmp_path)


def test_untied_output_head_is_refused(tmp_path, small_hf_checkpoint):
    def edit(tensors):
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1

    copy_checkpoint(small_hf_checkpoint[0], tmp_path, edit_tensors=edit)
    with pytest.raises(CheckpointError, match="lm_head.weight differs from the token embedding"):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_corrupt_files_are_named(tmp_path, small_hf_checkpoint, weights_file, damage):
    directory, reference = small_hf_checkpoint
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    path = tmp_path / weights_file
    if weights_file.endswith(".bin"):
        torch.save(reference.state_dict(), path)
    else:
        path.write_bytes((directory / weights_file).read_bytes())
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2] if damage == "truncated" else b"garbage" * 64)
    with pytest.raises(CheckpointError, match=f"{weights_file} is truncated or corrupt"):
        GPT2.from_pretrained(tmp_path)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_pickles_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"wte.weight": _RunsCode(marker)}, tmp_path / "evil.bin")
    config = GPT2Config(vocab_size=50, n_ctx=8, d_model=16, n_layer=1, n_head=2)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        GPT2.from_pretrained(tmp_path / "evil.bin", config=config)
    assert not marker.exists()


def test_corrupt_config_is_named(tmp_path, small_hf_checkpoint):
    copy_checkpoint(small_hf_checkpoint[0], tmp_path)
    (tmp_path / "config.json").write_text('{"n_layer": 3,')
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("activation_function", "gelu", "activation_function is 'gelu'"),
        ("activation_function", "relu", "activation_function is 'relu'"),
        ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx is True"),
        ("reorder_and_upcast_attn", True, "reorder_and_upcast_attn is True"),
        ("scale_attn_weights", False, "scale_attn_weights is False"),
        ("tie_word_embeddings", False, "tie_word_embeddings is False"),
        ("add_cross_attention", True, "add_cross_attention is True"),
        ("n_inner", 100, "n_inner is 100"),
        ("model_type", "llama", "model_type is 'llama'"),
        ("n_head", 5, "divisible by n_head"),
        ("n_layer", None, "config lacks n_layer"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, small_hf_checkpoint, field, value, reason):
    def edit(config):
        if value is None:
            del config[field]
        else:
            config[field] = value

    copy_checkpoint(small_hf_checkpoint[0], tmp_path, edit_config=edit)
    with pytest.raises(CheckpointError, match=reason):
        GPT2.from_pretrained(tmp_path)


def test_bad_arguments_are_type_errors(small_hf_checkpoint):
    directory, _ = small_hf_checkpoint
    with pytest.raises(TypeError, match="dtype"):
        GPT2.from_pretrained(directory, dtype=torch.int64)
    with pytest.raises(TypeError, match="config must be a GPT2Config"):
        GPT2.from_pretrained(directory, config={"n_layer": 3})


def test_differing_dropout_rates_warn_and_use_the_residual_rate(tmp_path, small_hf_checkpoint):
    def edit(config):
        config.update(resid_pdrop=0.2, embd_pdrop=0.1, attn_pdrop=0.0)

    copy_checkpoint(small_hf_checkpoint[0], tmp_path, edit_config=edit)
    with pytest.warns(UserWarning, match="dropout rates differ"):
        model = GPT2.from_pretrained(tmp_path)
    assert model.config.dropout == 0.2


# --- durability --------------------------------------------------------------------------------

TINY_SAVE = GPT2Config(vocab_size=50, n_ctx=8, d_model=16, n_layer=1, n_head=2)


def save_killed_at(model, directory, point: int) -> bool:
    """Save `model` into `directory` in a forked child that kills itself (SIGKILL: no cleanup
    runs) at file-system operation number `point // 2`, before it when `point` is even and after
    it when odd. Returns whether the child was killed (False: the save finished first)."""
    operations = [
        (pathlib.Path, "rename"), (pathlib.Path, "write_text"), (pathlib.Path, "mkdir"),
        (os, "link"), (shutil, "rmtree"), (atomic, "_exchange"), (atomic, "_fsync"),
        (safetensors.torch, "save_file"),
    ]
    pid = os.fork()
    if pid == 0:  # the child: count operations, die at the chosen one
        try:
            counter = [0]

            def dying(original):
                def operation(*args, **kwargs):
                    index, counter[0] = counter[0], counter[0] + 1
                    if point == 2 * index:
                        os.kill(os.getpid(), signal.SIGKILL)
                    result = original(*args, **kwargs)
                    if point == 2 * index + 1:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return result
                return operation

            for owner, name in operations:
                setattr(owner, name, dying(getattr(owner, name)))
            model.save_pretrained(directory)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two renames"])
def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch,
                                                                          exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    directory = tmp_path / "checkpoint"
    old, new = GPT2(TINY_SAVE.replace(seed=1)), GPT2(TINY_SAVE.replace(seed=2))
    (tmp_path / "checkpoint").mkdir()
    (directory / "tokenizer.json").write_text("{}")  # someone else's file, to be kept
    old.save_pretrained(directory)
    expected = {"old": old.state_dict(), "new": new.state_dict()}
    point, outcomes = 0, set()
    while save_killed_at(new, directory, point):
        loaded = GPT2.from_pretrained(directory).state_dict()
        matches = [name for name, state in expected.items()
                   if all(torch.equal(loaded[key], value) for key, value in state.items())]
        assert len(matches) == 1, f"killed at point {point}: neither the old nor the new weights"
        assert (directory / "tokenizer.json").read_text() == "{}"
        outcomes.add(matches[0])
        old.save_pretrained(directory)  # back to the old version; cleans up what the kill left
        assert sorted(os.listdir(tmp_path)) == ["checkpoint"], f"leftovers after point {point}"
        point += 1
    assert point > 10 and outcomes == {"old", "new"}
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_corruption_that_keeps_the_length_is_caught_and_named(tmp_path):
    GPT2(TINY_SAVE).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-100] ^= 0xFF  # a byte inside the last tensor's data
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt: tensor '.*' does "
                                              "not match the checksum"):
        GPT2.from_pretrained(tmp_path)


def test_files_without_our_checksums_still_load(tmp_path, small_hf_checkpoint):
    directory, _ = small_hf_checkpoint
    with safetensors.safe_open(directory / "model.safetensors", "pt") as opened:
        assert "gpt2_decl.crc32" not in (opened.metadata() or {})
    GPT2.from_pretrained(directory)


def test_saving_over_other_formats_removes_their_weights_so_they_cannot_shadow(tmp_path):
    torch.save({}, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    GPT2(TINY_SAVE).save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_state_dicts_with_earlier_gpt2_decl_names_load(tmp_path):
    model = GPT2(TINY_SAVE.replace(seed=7))
    earlier = {"attn.qkv": "qkv", "attn.proj": "attn_out", "mlp.up": "mlp_in",
               "mlp.down": "mlp_out"}
    state = {}
    for key, value in model.state_dict().items():
        for now, before in earlier.items():
            key = key.replace(f".{now}.", f".{before}.")
        state[key] = value
    assert "blocks.0.mlp_out.weight" in state
    torch.save(state, tmp_path / "weights.pt")
    loaded = GPT2.from_pretrained(tmp_path / "weights.pt", config=model.config)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_training_run_directory_loads_its_latest_checkpoint(tmp_path):
    model = GPT2(TINY_SAVE)
    model.save_pretrained(tmp_path / "checkpoints" / "step-0000002")
    (tmp_path / "latest").symlink_to(pathlib.Path("checkpoints") / "step-0000002")
    assert torch.equal(GPT2.from_pretrained(tmp_path).lm_head.weight, model.lm_head.weight)
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(CheckpointNotFoundError, match="latest link points to .*step-0000002, "
                                                      "which holds no checkpoint"):
        GPT2.from_pretrained(tmp_path)


def test_a_hub_name_is_not_downloaded_and_the_error_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="downloads nothing: if 'gpt2' is a Hugging "
                                                      "Face hub name"):
        GPT2.from_pretrained("gpt2")


def test_a_device_this_machine_lacks_is_named(tmp_path):
    GPT2(TINY_SAVE).save_pretrained(tmp_path)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="asks for CUDA, but this machine has no CUDA GPU"):
        GPT2.from_pretrained(tmp_path, device="cuda")
