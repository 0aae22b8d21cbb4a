import pytest
import torch
import torch.nn.functional as F

from gpt2_decl import GPT2, GPT2Config, layers
from gpt2_decl.kv_cache import KVCache

CONFIG = GPT2Config(vocab_size=97, n_ctx=32, d_model=48, n_layer=2, n_head=3, init_std=0.2)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Graphs compiled here stay out of later tests' recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def cached_attention_inputs(dtype: torch.dtype, batch: int = 2, visible_len: int = 7):
    generator = torch.Generator().manual_seed(4)
    q, keys, values = (
        torch.randn(shape, generator=generator).to(dtype)
        for shape in [(batch, 3, 1, 16), (batch, 3, 12, 16), (batch, 3, 12, 16)]
    )
    visible = torch.arange(12) <= torch.tensor([visible_len - 1])[:, None]
    return q, keys, values, visible


def reference_attention(q, keys, values, visible):
    """Softmax attention in float64 over the visible positions only (the rest cut off)."""
    n = int(visible.sum())
    scores = q.double() @ keys[..., :n, :].double().mT / q.shape[-1] ** 0.5
    return scores.softmax(-1) @ values[..., :n, :].double()


def test_one_query_attention_matches_a_float64_reference():
    q, keys, values, visible = cached_attention_inputs(torch.float32)
    expected = reference_attention(q, keys, values, visible)
    result = layers.attend_one_query(q, keys, values, visible)
    assert result.dtype == torch.float32
    assert (result.double() - expected).abs().max() < 1e-6
    sdpa = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
    assert (result - sdpa).abs().max() < 1e-6


def test_one_query_attention_ignores_positions_past_the_visible_ones():
    q, keys, values, visible = cached_attention_inputs(torch.float32, visible_len=5)
    result = layers.attend_one_query(q, keys, values, visible)
    keys[..., 5:, :] = 1e4
    values[..., 5:, :] = -1e4
    assert torch.equal(layers.attend_one_query(q, keys, values, visible), result)


def test_one_query_attention_in_bfloat16_accumulates_in_float32():
    q, keys, values, visible = cached_attention_inputs(torch.bfloat16)
    expected = reference_attention(q, keys, values, visible)
    result = layers.attend_one_query(q, keys, values, visible)
    assert result.dtype == torch.bfloat16
    # Only the output's own rounding to bfloat16 (8 significant bits) remains.
    assert ((result.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-6).all()


def graph_ops(model: GPT2, tokens: torch.Tensor, cache: KVCache) -> set[str]:
    """The operators of the graph dynamo traces for one call, by name."""
    ops: set[str] = set()

    def record(graph_module, example_inputs):
        ops.update(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    with torch.no_grad():
        torch.compile(model, backend=record, fullgraph=True)(tokens, cache)
    return ops


@pytest.mark.parametrize(("seq", "uses_sdpa"), [(1, False), (4, True)])
def test_compiled_cpu_decoding_attends_one_query_without_sdpa(seq, uses_sdpa):
    model = GPT2(CONFIG).eval()
    cache = KVCache(CONFIG, 2, CONFIG.n_ctx, dtype=model.dtype, device=model.device)
    cache.positions = torch.arange(5, 5 + seq)
    ops = graph_ops(model, torch.zeros(2, seq, dtype=torch.long), cache)
    assert any("scaled_dot_product_attention" in op for op in ops) == uses_sdpa


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_cached_step_matches_eager(dtype):
    model = GPT2(CONFIG).eval().to(dtype)
    prompt = torch.randint(CONFIG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    step = torch.compile(model, fullgraph=True, options=layers.ONE_ROW_INDUCTOR_OPTIONS)
    logits = {}
    with torch.no_grad():
        for name, run in [("eager", model), ("compiled", step)]:
            cache = KVCache(CONFIG, 2, CONFIG.n_ctx, dtype=dtype, device=model.device)
            cache.positions = torch.arange(6)
            model(prompt, cache)
            cache.positions = torch.tensor([6])
            logits[name] = run(prompt[:, -1:], cache).float()
    tolerance = 1e-5 if dtype == torch.float32 else 0.05 * logits["eager"].abs().max()
    assert (logits["compiled"] - logits["eager"]).abs().max() <= tolerance
