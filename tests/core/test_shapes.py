"""Shapes checked on the meta device: every layer of a real or meta model, inside compiled
models in typechecked mode, and the shape table against a real forward pass."""

import re

import pytest
import torch
from torch import nn

import gpt2_decl
from gpt2_decl import GPT2, GPT2Config, ShapeError, check_shapes, shape_table
from gpt2_decl.cli import main

TINY = GPT2Config(vocab_size=97, n_ctx=32, d_model=48, n_layer=3, n_head=4, seed=2)


def widen_mlp(model: GPT2, block: int, extra: int = 8) -> None:
    """Give one block's MLP a wider hidden layer, consistently: a model that still runs."""
    mlp = model.blocks[block].mlp
    d_model, d_mlp = model.config.d_model, model.config.d_mlp + extra
    mlp.up, mlp.down = nn.Linear(d_model, d_mlp), nn.Linear(d_mlp, d_model)


# (what to corrupt, the function and argument the error must name)
CORRUPTIONS = {
    "a wider MLP": (
        lambda m: widen_mlp(m, 1),
        "layers.mlp_up(): argument 'weights.w_up' expected Float[Tensor, '4*d_model d_model'], "
        "got float32[200, 48]: the dimension size 200 does not equal the existing value of "
        "4*d_model=192"),
    "a qkv bias too short": (
        lambda m: setattr(m.blocks[2].attn.qkv, "bias", nn.Parameter(torch.zeros(140))),
        "layers.qkv_heads(): argument 'weights.b_qkv' expected Float[Tensor, '3*d_model']"),
    "a LayerNorm gain too long": (
        lambda m: setattr(m.blocks[0].ln_2, "weight", nn.Parameter(torch.ones(50))),
        "layers.layer_norm(): argument 'weights.gain' expected Float[Tensor, 'd_model']"),
    "an output projection of the wrong width": (
        # qkv_heads is the first function to receive the attention's weights.
        lambda m: setattr(m.blocks[1].attn.proj, "weight", nn.Parameter(torch.zeros(48, 40))),
        "layers.qkv_heads(): argument 'weights.w_out' expected Float[Tensor, 'd_model d_model']"),
    "a narrower position embedding": (
        lambda m: setattr(m.position_embedding, "weight", nn.Parameter(torch.zeros(32, 40))),
        "layers.embeddings(): argument 'position_embedding' expected "
        "Float[Tensor, 'n_ctx d_model']"),
}


def test_a_valid_model_passes_and_binds_every_axis():
    check = check_shapes(GPT2(TINY), batch=2, seq=7)
    axes = check.axes
    assert axes["batch"] == {2} and axes["d_model"] == {48} and axes["d_head"] == {12}
    assert axes["head"] == {4} and axes["vocab"] == {97} and axes["d_mlp"] == {192}
    functions = [call.function for call in check.calls]
    assert sum(name.endswith("Block.forward()") for name in functions) == 3
    assert functions[-1] == "gpt2_decl.core.model.GPT2.forward()"  # recorded as it returns


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_corrupted_weight_is_named_by_function_and_argument(name):
    corrupt, expected = CORRUPTIONS[name]
    model = GPT2(TINY)
    corrupt(model)
    with pytest.raises(ShapeError, match=re.escape("gpt2_decl.core." + expected)):
        check_shapes(model, batch=2, seq=5)


def test_a_real_model_is_checked_without_touching_its_weights():
    model = GPT2(TINY).eval()
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    check_shapes(model, batch=3, seq=9, cache=True)
    check_shapes(model, batch=3, seq=9, training=True)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == before
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_gpt2_xl_at_batch_64_full_context_is_checked_without_memory():
    # Run for real this would need tens of GB of activations.
    with torch.device("meta"):
        model = GPT2(GPT2Config.from_preset("xl"))
    check = check_shapes(model, batch=64, seq=1024)
    assert check.axes["d_model"] == {1600} and check.axes["batch"] == {64}


def test_the_cached_check_covers_the_prompt_and_a_one_token_step():
    check = check_shapes(GPT2(TINY), batch=2, seq=5, cache=True)
    seqs = [call.axes.get("seq") for call in check.calls if call.function.endswith("attend()")]
    assert seqs == [5] * 3 + [1] * 3
    kv = [call.axes.get("kv_seq") for call in check.calls if call.function.endswith("attend()")]
    assert kv == [6] * 6  # the whole cache, masked


def test_the_backward_check_finds_a_gradient_of_the_wrong_shape():
    class Broken(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad[..., :-1]

    model = GPT2(TINY)
    original = model.embed

    def embed(tokens, positions, site):
        return Broken.apply(original(tokens, positions, site))

    model.embed = embed
    with pytest.raises(ShapeError, match="backward pass: .*invalid gradient"):
        check_shapes(model, batch=2, seq=4, training=True)


@pytest.mark.parametrize(("arguments", "message"), [
    (dict(batch=0, seq=4), "batch must be a positive integer, got 0"),
    (dict(batch=1, seq=-3), "seq must be a positive integer, got -3"),
    (dict(batch=1, seq=33), "seq=33 does not fit the context of 32"),
    (dict(batch=1, seq=32, cache=True), "with a cache of 33 does not fit the context of 32"),
    (dict(batch=1, seq=4, cache=True, training=True), "check them one at a time"),
])
def test_impossible_sizes_are_refused_in_one_line(arguments, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_shapes(GPT2(TINY), **arguments)


# --- compiled and typechecked ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_compiled_typechecked_model_names_a_corrupted_layer(name):
    corrupt, expected = CORRUPTIONS[name]
    model = GPT2(TINY).eval()
    compiled = gpt2_decl.compile(model)
    tokens = torch.randint(TINY.vocab_size, (2, 6))
    corrupt(model)
    with gpt2_decl.typechecked(), torch.no_grad(), pytest.raises(ShapeError) as caught:
        compiled(tokens)
    assert expected in str(caught.value)


def test_a_weight_corrupted_after_the_first_call_is_caught_on_recompilation():
    model = GPT2(TINY).eval()
    compiled = gpt2_decl.compile(model, backend="eager")  # Dynamo's recompiling is what counts
    tokens = torch.randint(TINY.vocab_size, (2, 6))
    with gpt2_decl.typechecked(), torch.no_grad():
        compiled(tokens)
        widen_mlp(model, 2)
        with pytest.raises(ShapeError, match="argument 'weights.w_up'"):
            compiled(tokens)


def test_checks_run_once_per_input_signature_and_never_with_the_mode_off():
    model = GPT2(TINY).eval()
    compiled = gpt2_decl.compile(model, backend="eager")
    with torch.no_grad():
        compiled(torch.zeros(2, 6, dtype=torch.long))
        assert compiled.checked == set()
        with gpt2_decl.typechecked():
            for seq in (6, 6, 7, 6):
                compiled(torch.zeros(2, seq, dtype=torch.long))
    assert len(compiled.checked) == 2


def test_the_compiled_decoding_step_is_checked_too():
    model = GPT2(TINY).eval()
    prompt = torch.randint(TINY.vocab_size, (1, 4))
    widen_mlp(model, 0)
    with gpt2_decl.typechecked(False):
        model.generate(prompt, 2, greedy=True, compile="eager")  # unchecked: it runs
    torch._dynamo.reset()
    with gpt2_decl.typechecked(), pytest.raises(ShapeError, match="layers.mlp_up"):
        model.generate(prompt, 2, greedy=True, compile="eager")


# --- the table -------------------------------------------------------------------------------


def hooked_shapes(model: GPT2, batch: int, seq: int) -> dict[str, tuple]:
    """The shapes a real forward pass gives each block and the model, seen by forward hooks."""
    shapes = {}
    for index, block in enumerate(model.blocks):
        block.register_forward_hook(
            lambda module, inputs, output, index=index: shapes.update({index: output.shape}))
    with torch.no_grad():
        shapes["logits"] = model(torch.zeros(batch, seq, dtype=torch.long)).shape
    return shapes


@pytest.mark.parametrize(("config", "batch", "seq"), [
    (TINY, 2, 7), (GPT2Config(vocab_size=211, n_ctx=64, d_model=64, n_layer=2, n_head=8), 1, 64),
])
def test_the_table_shows_the_shapes_of_a_real_forward_pass(config, batch, seq):
    table = shape_table(config, batch, seq)
    rows = {line[:24].strip(): line[24:].split() for line in table.splitlines()[3:] if line}

    def sizes(row):
        return tuple(int(part.split("=")[1]) for part in rows[row] if "=" in part)

    real = hooked_shapes(GPT2(config), batch, seq)
    d_model, d_head = config.d_model, config.d_model // config.n_head
    for block in range(config.n_layer):
        assert sizes(f"blocks.{block}.resid_post") == tuple(real[block])
        assert sizes(f"blocks.{block}.attn_in") == (batch, seq, d_model)
        for name in ("q", "k", "v", "z"):
            assert sizes(f"blocks.{block}.{name}") == (batch, config.n_head, seq, d_head)
        assert sizes(f"blocks.{block}.pattern") == (batch, config.n_head, seq, seq)
        assert sizes(f"blocks.{block}.mlp_post") == (batch, seq, 4 * d_model)
    assert sizes("logits") == tuple(real["logits"])
    assert sizes("embed") == sizes("ln_final") == (batch, seq, d_model)
    assert len(rows) == 2 + 15 * config.n_layer + 3 + 1  # and the total's line


def test_the_table_of_small_names_its_axes_and_counts(capsys):
    table = shape_table(GPT2Config.from_preset("small"), batch=2, seq=128)
    assert "embed                   batch=2 seq=128 d_model=768" in table
    assert "blocks.11.mlp_post      batch=2 seq=128 d_mlp=3072" in table
    assert "blocks.3.pattern        batch=2 head=12 seq=128 kv_seq=128" in table
    assert "124,439,808 parameters (163,037,184 counted untied" in table


# --- the command -----------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "expected"), [
    (["--preset", "medium", "--batch", "2", "--seq", "16"],
     ["blocks.23.mlp_pre", "batch=2 seq=16 d_mlp=4096", "354,823,168 parameters"]),
    (["--n-layer", "2", "--n-head", "4", "--d-model", "64", "--n-ctx", "32"],
     ["blocks.1.resid_post", "batch=1 seq=32 d_model=64", "batch=1 head=4 seq=32 d_head=16"]),
])
def test_summary_shapes_for_presets_and_custom_sizes(flags, expected, capsys):
    main(["summary", "--shapes", *flags])
    out = capsys.readouterr().out
    for text in expected:
        assert text in out


def test_summary_shapes_of_a_checkpoint_reads_its_headers_only(tmp_path, capsys):
    config = GPT2Config(vocab_size=300, n_ctx=40, d_model=32, n_layer=2, n_head=2)
    GPT2(config).save_pretrained(tmp_path)
    main(["summary", "--shapes", "--checkpoint", str(tmp_path), "--seq", "40"])
    assert "logits                  batch=1 seq=40 vocab=300" in capsys.readouterr().out
    # The tensors' data is never read: a checkpoint whose data is garbage still tabulates...
    file = tmp_path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-64:] = b"\xff" * 64
    file.write_bytes(bytes(data))
    main(["summary", "--shapes", "--checkpoint", str(tmp_path)])
    # ...but a header that disagrees with config.json is named.
    (tmp_path / "config.json").write_text(
        (tmp_path / "config.json").read_text().replace('"n_embd": 32', '"n_embd": 64'))
    with pytest.raises(SystemExit, match="shape mismatches"):
        main(["summary", "--shapes", "--checkpoint", str(tmp_path)])


@pytest.mark.parametrize(("flags", "message"), [
    (["--seq", "2000"], "seq=2000 does not fit the context of 1024"),
    (["--checkpoint", "no/such/dir"], "checkpoint not found"),
    (["--checkpoint", ".", "--n-layer", "2"], "--checkpoint gives the architecture; drop "),
])
def test_summary_shapes_refuses_bad_input_in_one_line(flags, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["summary", "--shapes", *flags])
    assert message in str(exited.value.code) and "\n" not in str(exited.value.code)


def test_a_checkpoint_directory_without_config_json_is_named(tmp_path):
    with pytest.raises(SystemExit, match="neither a checkpoint directory .no config.json."):
        main(["summary", "--shapes", "--checkpoint", str(tmp_path)])
