"""Independent references the tests compare against, test doubles, and decoding scenarios that
several tests check."""

import math
from dataclasses import dataclass

import torch

from gpt2_decl import GPT2


def reference_logits(model: GPT2, tokens: torch.Tensor) -> torch.Tensor:
    """GPT-2 written out longhand (explicit mask, softmax and tanh GELU formula), from the paper's
    description rather than from our layers, reading the same weights."""
    config = model.config
    batch, seq = tokens.shape
    n_head, d_head = config.n_head, config.d_head
    x = model.token_embedding.weight[tokens] + model.position_embedding.weight[:seq]

    def norm(x, module):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + config.layer_norm_eps) * module.weight + module.bias

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    mask = torch.ones(seq, seq, device=tokens.device).tril().bool()
    for block in model.blocks:
        qkv = norm(x, block.ln_1) @ block.attn.qkv.weight.T + block.attn.qkv.bias
        q, k, v = qkv.split(config.d_model, dim=-1)
        q, k, v = (t.reshape(batch, seq, n_head, d_head).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d_head)
        scores = scores.masked_fill(~mask, float("-inf"))
        heads = scores.softmax(-1) @ v
        merged = heads.transpose(1, 2).reshape(batch, seq, config.d_model)
        x = x + merged @ block.attn.proj.weight.T + block.attn.proj.bias
        hidden = gelu_tanh(norm(x, block.ln_2) @ block.mlp.up.weight.T + block.mlp.up.bias)
        x = x + hidden @ block.mlp.down.weight.T + block.mlp.down.bias
    return norm(x, model.ln_f) @ model.token_embedding.weight.T


class ByteTokenizer:
    """Each UTF-8 byte is a token; 256 ends a document. A tiny vocabulary for fast tests."""

    eot_id = 256
    vocab_size = 257

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return list(text.encode("utf-8"))


class HostReads:
    """Inside it, records every call of a tensor method that reads a value back on the host: on
    an accelerator each of them waits for the device (what torch.cuda.set_sync_debug_mode
    catches there, counted here on any device). The methods are wrapped rather than watched
    through a TorchFunctionMode, which compiled code would see and recompile for."""

    READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu",
             "numpy", "__array__")

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.originals = {name: getattr(torch.Tensor, name) for name in self.READS}

    def __enter__(self) -> "HostReads":
        for name, original in self.originals.items():
            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(*args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)


@dataclass
class Int8Change:
    """Greedy tokens of a quantized model, compiled and eager, before and after two of its int8
    weights changed in place (negated)."""

    before: torch.Tensor
    eager_before: torch.Tensor
    after: torch.Tensor
    eager_after: torch.Tensor


def decode_around_an_int8_change(quantized: GPT2) -> Int8Change:
    prompt = torch.randint(quantized.config.vocab_size, (1, 6),
                           generator=torch.Generator().manual_seed(6))

    def decode(compile: bool) -> torch.Tensor:
        return quantized.generate(prompt, 6, greedy=True, compile=compile)

    before, eager_before = decode(True), decode(False)
    with torch.no_grad():
        quantized.blocks[0].mlp.up.weight.qdata.neg_()
        quantized.blocks[1].mlp.down.weight.qdata.neg_()
    return Int8Change(before, eager_before, decode(True), decode(False))


def rewrites_in_trace(model: torch.nn.Module, backend, *args, **kwargs) -> dict[str, int]:
    """What `backend` (a `GraphRewrite`) rewrites in `model`'s traced forward on these
    arguments: how many calls each replacement took."""
    counts = []

    def counting_backend(graph_module, example_inputs):
        counts.append(backend.rewrite(graph_module))
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(model, backend=counting_backend, fullgraph=True)(*args, **kwargs)
    [count] = counts
    return count
