"""GGUF files for llama.cpp: read back with the gguf package (names, shapes, values, tokenizer)
and, where llama-cpp-python is installed, decoded by llama.cpp to the same greedy tokens."""

import numpy as np
import pytest
import torch

from gpt2_decl import GPT2, GPT2Config, GPT2Tokenizer
from gpt2_decl.cli import main
from gpt2_decl.storage.gguf import gguf_name, save_gguf

gguf = pytest.importorskip("gguf")

# GPT-2's vocabulary (the file carries its tokenizer), tiny otherwise.
TINY = GPT2Config(n_ctx=64, d_model=32, n_layer=2, n_head=2, init_std=0.2, seed=4)


@pytest.fixture(scope="module")
def model() -> GPT2:
    return GPT2(TINY).eval()


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {tensor.name: tensor for tensor in reader.tensors}


# Reading a file takes seconds (its tokenizer is 100,257 strings): each is written and read once.
@pytest.fixture(scope="module")
def float32_file(model, tmp_path_factory):
    path = save_gguf(model, tmp_path_factory.mktemp("gguf") / "model.gguf")
    return path, *read(path)


@pytest.fixture(scope="module")
def bfloat16_file(model, tmp_path_factory):
    path = save_gguf(model, tmp_path_factory.mktemp("gguf") / "model.gguf", dtype=torch.bfloat16)
    return path, *read(path)


def test_the_metadata_says_gpt2_and_its_sizes(float32_file):
    _, fields, _ = float32_file
    assert fields["general.architecture"] == "gpt2"
    assert (fields["gpt2.block_count"], fields["gpt2.context_length"],
            fields["gpt2.embedding_length"], fields["gpt2.feed_forward_length"],
            fields["gpt2.attention.head_count"]) == (2, 64, 32, 128, 2)
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)


def test_the_tokenizer_is_gpt2s_with_its_end_of_text(float32_file):
    _, fields, _ = float32_file
    tokens, merges = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.merges"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(tokens) == 50257 and len(merges) == 50000
    # "Hello world" is [15496, 995] in GPT-2; its tokens spell the words (a space is "Ġ").
    assert [tokens[15496], tokens[995]] == ["Hello", "Ġworld"]
    assert tokens[50256] == "<|endoftext|>" and merges[0] == "Ġ t"
    types = fields["tokenizer.ggml.token_type"]
    assert types[50256] == 3 and set(types[:50256]) == {1}
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == 50256


def test_float32_tensors_are_the_weights_under_llama_cpp_names(model, float32_file):
    _, _, tensors = float32_file
    expected = {"token_embd.weight", "position_embd.weight", "output_norm.weight",
                "output_norm.bias"} | {
        f"blk.{block}.{part}.{kind}" for block in range(2) for kind in ("weight", "bias")
        for part in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")}
    assert set(tensors) == expected  # no output.weight: llama.cpp ties it to the embedding
    for name, parameter in model.named_parameters():
        tensor = tensors[gguf_name(name)]
        assert list(tensor.shape) == list(parameter.shape)[::-1]  # ggml counts axes inside out
        np.testing.assert_array_equal(tensor.data.reshape(parameter.shape),
                                      parameter.detach().numpy())


def test_a_bfloat16_file_rounds_the_matrices_and_keeps_the_rest_float32(model, bfloat16_file):
    _, _, tensors = bfloat16_file
    for name, parameter in model.named_parameters():
        tensor = tensors[gguf_name(name)]
        matrix = parameter.ndim == 2 and name != "position_embedding.weight"
        kind = gguf.GGMLQuantizationType.BF16 if matrix else gguf.GGMLQuantizationType.F32
        assert tensor.tensor_type == kind, name
        if matrix:
            bits = torch.from_numpy(tensor.data.view(np.int16).reshape(parameter.shape).copy())
            assert torch.equal(bits.view(torch.bfloat16), parameter.detach().to(torch.bfloat16))


@pytest.mark.parametrize(("config", "dtype", "message"), [
    (TINY.replace(vocab_size=300), None, "GPT-2's tokenizer, whose 50257 tokens"),
    (TINY, torch.float16, "float32 or bfloat16, not torch.float16"),
])
def test_what_a_gguf_file_cannot_hold_is_refused(config, dtype, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        save_gguf(GPT2(config), tmp_path / "model.gguf", dtype=dtype)
    assert not (tmp_path / "model.gguf").exists()


def test_the_export_command_writes_a_checkpoint_as_gguf(model, bfloat16_file, tmp_path, capsys):
    model.save_pretrained(tmp_path / "checkpoint")
    main(["export", "--checkpoint", str(tmp_path / "checkpoint"), "--out",
          str(tmp_path / "model.gguf"), "--dtype", "bfloat16"])
    assert "model.gguf" in capsys.readouterr().out
    # The file the library writes from the model itself, checked above, byte for byte.
    assert (tmp_path / "model.gguf").read_bytes() == bfloat16_file[0].read_bytes()


def test_llama_cpp_decodes_the_file_to_our_greedy_tokens(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    model = GPT2(TINY.replace(n_layer=3, d_model=64, n_head=4)).eval()
    path = save_gguf(model, tmp_path / "model.gguf")
    prompt = GPT2Tokenizer().encode("The quick brown fox")
    ours = model.generate(torch.tensor([prompt]), 24, greedy=True)[0, len(prompt):].tolist()
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    theirs = []
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        theirs.append(token)
        if len(theirs) == 24:
            break
    assert theirs == ours
