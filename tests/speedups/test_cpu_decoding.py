"""The compiled CPU decoding step's rewrites: each against a float64 reference, applied where
they should be and nowhere else, and the rewritten step against eager."""

import pytest
import torch
import torch.nn.functional as F

import gpt2_decl
from gpt2_decl import GPT2, GPT2Config, KVCache
from gpt2_decl.speedups import cpu_decoding, row_kernels
from gpt2_decl.speedups.cpu_decoding import CpuDecoding, one_query_attention, one_row_linear

CONFIG = GPT2Config(vocab_size=97, n_ctx=32, d_model=48, n_layer=2, n_head=3, init_std=0.2)



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


def test_one_query_attention_matches_a_float64_reference_and_sdpa():
    q, keys, values, visible = cached_attention_inputs(torch.float32)
    result = one_query_attention(q, keys, values, attn_mask=visible)
    assert result.dtype == torch.float32
    assert (result.double() - reference_attention(q, keys, values, visible)).abs().max() < 1e-6
    sdpa = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
    assert (result - sdpa).abs().max() < 1e-6


def test_one_query_attention_ignores_positions_past_the_visible_ones():
    q, keys, values, visible = cached_attention_inputs(torch.float32, visible_len=5)
    result = one_query_attention(q, keys, values, attn_mask=visible)
    keys[..., 5:, :] = 1e4
    values[..., 5:, :] = -1e4
    assert torch.equal(one_query_attention(q, keys, values, attn_mask=visible), result)


def test_one_query_attention_in_bfloat16_accumulates_in_float32():
    q, keys, values, visible = cached_attention_inputs(torch.bfloat16)
    expected = reference_attention(q, keys, values, visible)
    result = one_query_attention(q, keys, values, attn_mask=visible)
    assert result.dtype == torch.bfloat16
    # Only the output's own rounding to bfloat16 (8 significant bits) remains.
    assert ((result.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_linear_accumulates_in_float32(dtype):
    generator = torch.Generator().manual_seed(1)
    x, weight, bias = (torch.randn(shape, generator=generator).to(dtype)
                       for shape in [(1, 1, 64), (24, 64), (24,)])
    expected = x.double() @ weight.double().T
    result = one_row_linear(x, weight, bias)
    assert result.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(result.double(), (expected.to(dtype) + bias).double(),
                               atol=tolerance * 4, rtol=tolerance)


def rewritten_graph(model: GPT2, tokens: torch.Tensor, cache: KVCache,
                    decoding: CpuDecoding | None = None) -> tuple[dict, set[str]]:
    """What the backend rewrites in the graph Dynamo traces for one call, and the operators
    left after, by name."""
    found: dict = {}

    def backend(graph_module, example_inputs):
        found["counts"] = (decoding or CpuDecoding()).rewrite(graph_module)
        found["ops"] = {str(node.target) for node in graph_module.graph.nodes}
        return graph_module.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(tokens, cache, check_values=False)
    return found["counts"], found["ops"]


def prefilled_cache(model: GPT2, batch: int, seq: int = 5) -> KVCache:
    cache = KVCache(CONFIG, batch, CONFIG.n_ctx, dtype=model.dtype, device=model.device)
    with torch.no_grad():
        model(torch.zeros(batch, seq, dtype=torch.long), cache)
    return cache


@pytest.mark.parametrize(("batch", "seq", "rows", "queries"), [(1, 1, 9, 2), (2, 1, 0, 2),
                                                                (1, 4, 0, 0)])
def test_rewrites_apply_to_single_rows_and_single_queries_only(batch, seq, rows, queries):
    # 2 layers of 4 products (qkv, out, up, down), and the head; one attention per layer.
    model = GPT2(CONFIG).eval()
    cache = prefilled_cache(model, batch)
    counts, ops = rewritten_graph(model, torch.zeros(batch, seq, dtype=torch.long), cache)
    assert counts == {"one_row_products": rows, "one_query_attention": queries,
                      "kernel_products": 0, "kernel_attention": 0}
    assert any("scaled_dot_product_attention" in op for op in ops) == (queries == 0)


def test_switched_off_rewrites_leave_the_graph_alone():
    model = GPT2(CONFIG).eval()
    cache = prefilled_cache(model, 1)
    counts, _ = rewritten_graph(model, torch.zeros(1, 1, dtype=torch.long), cache,
                                CpuDecoding(one_row_products=False, one_query_attention=False))
    assert counts == {"one_row_products": 0, "one_query_attention": 0, "kernel_products": 0,
                      "kernel_attention": 0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rewritten_inductor_step_matches_eager(dtype):
    model = GPT2(CONFIG).eval().to(dtype)
    prompt = torch.randint(CONFIG.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    step = torch.compile(model, fullgraph=True, backend=CpuDecoding().backend)
    logits = {}
    with torch.no_grad():
        for name, run in [("eager", model), ("compiled", step)]:
            cache = KVCache(CONFIG, 1, CONFIG.n_ctx, dtype=dtype, device=model.device)
            model(prompt, cache)
            logits[name] = run(prompt[:, -1:], cache, check_values=False).float()
    tolerance = 1e-5 if dtype == torch.float32 else 0.05 * logits["eager"].abs().max()
    assert (logits["compiled"] - logits["eager"]).abs().max() <= tolerance


@pytest.mark.parametrize("one_row, packed, kernel, one_query, kernel_attention, used", [
    ((1.0, 2.0), (3.0, 2.0), (2.5, 2.0), (4.0, 3.0), (5.0, 3.0), {"one_row_products"}),
    ((2.0, 1.0), (3.0, 1.0), (1.5, 1.0), (3.0, 4.0), (5.0, 4.0), {"one_query_attention"}),
    ((2.0, 1.0), (0.5, 1.0), (1.5, 1.0), (3.0, 4.0), (3.5, 4.0),  # two win: the faster
     {"packed_products", "one_query_attention"}),
    ((0.8, 1.0), (0.6, 1.0), (1.5, 1.0), (3.0, 4.0), (2.0, 4.0),
     {"packed_products", "kernel_attention"}),
    ((0.6, 1.0), (0.8, 1.0), (1.5, 1.0), (5.0, 4.0), (3.0, 4.0),
     {"one_row_products", "kernel_attention"}),
    ((0.6, 1.0), (0.8, 1.0), (0.4, 1.0), (3.0, 4.0), (4.0, 4.0),  # all three products win
     {"kernel_products", "one_query_attention"}),
    ((2.0, 1.0), (1.5, 1.0), (0.9, 1.0), (5.0, 4.0), (4.5, 4.0), {"kernel_products"}),
])
def test_choice_takes_each_rewrite_only_where_it_timed_faster(monkeypatch, one_row, packed,
                                                              kernel, one_query,
                                                              kernel_attention, used):
    products = {"one_row_products": one_row, "packed_products": packed,
                "kernel_products": kernel}
    attention = {"one_query_attention": one_query, "kernel_attention": kernel_attention}
    monkeypatch.setattr(cpu_decoding, "_time_products", lambda model, rows: dict(products))
    monkeypatch.setattr(cpu_decoding, "_time_attention", lambda model: dict(attention))
    monkeypatch.setattr(cpu_decoding, "_choices", {})
    choice = cpu_decoding.choice_for(GPT2(CONFIG).eval())
    for way in [*products, *attention]:
        assert getattr(choice.decoding, way) == (way in used), way
    assert choice.decoding.freezes == ("packed_products" in used)
    assert choice.decoding.store_pointwise
    assert choice.times_ms == products | attention
    on_or_off = "on" if "one_row_products" in used else "off"
    assert f"one_row_products {on_or_off} ({one_row[0]:.2f} ms with" in choice.describe()


def test_attention_is_timed_each_way_that_applies(monkeypatch):
    compiled = []  # which ways were compiled to be timed (not compiled here: names suffice)
    monkeypatch.setattr(cpu_decoding, "_compiled",
                        lambda function, decoding: compiled.append(decoding) or (lambda *a: a))
    model = GPT2(CONFIG).eval()
    kernel = {"kernel_attention"} if row_kernels.load() is None else set()
    with torch.no_grad():
        assert set(cpu_decoding._time_attention(model)) == {"one_query_attention"} | kernel
        monkeypatch.setattr(row_kernels, "load", lambda: "no C++ compiler here")
        assert set(cpu_decoding._time_attention(model)) == {"one_query_attention"}
    with_kernel = [["kernel_attention", "store_pointwise"]] if kernel else []
    assert [decoding.names() for decoding in compiled] == [
        ["store_pointwise"], ["one_query_attention", "store_pointwise"], *with_kernel,
        ["store_pointwise"], ["one_query_attention", "store_pointwise"]]


def test_products_are_timed_each_way_that_applies_to_the_weights_and_rows(monkeypatch,
                                                                         every_product_way):
    compiled = []  # which ways were compiled to be timed (not compiled here: names suffice)
    monkeypatch.setattr(cpu_decoding, "_compiled_products",
                        lambda linears, decoding: compiled.append(decoding) or (lambda x: x))
    float_model = GPT2(CONFIG).eval()
    int8 = gpt2_decl.quantize(GPT2(CONFIG).eval(), "int8")  # no packed int8 weights
    kernel = {"kernel_products"} if row_kernels.load() is None else set()
    with torch.no_grad():
        assert set(cpu_decoding._time_products(float_model, 1)) == {
            "one_row_products", "packed_products"} | kernel
        assert set(cpu_decoding._time_products(float_model, 3)) == {"packed_products"} | kernel
        assert set(cpu_decoding._time_products(int8, 1)) == {"one_row_products"} | kernel
        assert set(cpu_decoding._time_products(int8, 3)) == kernel
    with_kernel = [["kernel_products", "store_pointwise"]] if kernel else []
    assert [decoding.names() for decoding in compiled] == [
        ["store_pointwise"], ["one_row_products", "store_pointwise"],
        ["packed_products", "store_pointwise"], *with_kernel,
        ["store_pointwise"], ["packed_products", "store_pointwise"], *with_kernel,
        ["store_pointwise"], ["one_row_products", "store_pointwise"], *with_kernel,
        *(["store_pointwise"], *with_kernel) * bool(kernel)]  # int8, 3 rows: the kernel only


def fastest(*ways_at_each_size: str) -> dict[int, dict[str, float]]:
    """Prompt timings in which the named way was the fastest at each size, smallest first."""
    return {rows: {"kernel": 2.0, "wide": 2.0, "library": 2.0} | {way: 1.0}
            for rows, way in zip(cpu_decoding.PREFILL_ROWS[:len(ways_at_each_size)],
                                 ways_at_each_size, strict=True)}


@pytest.mark.parametrize(("times", "limits", "described"), [
    (fastest("kernel", "kernel", "kernel"), (1024, 0),
     "prompt through the kernel up to 1024 rows, widened off (ms: at 32 rows kernel 1.00 wide "
     "2.00 library 2.00"),
    (fastest("kernel", "wide", "wide"), (32, 1024), "kernel up to 32 rows, widened up to 1024"),
    (fastest("wide", "wide", "kernel"), (0, 256), "kernel off, widened up to 256 rows"),
    (fastest("kernel", "library", "wide"), (32, 0), "kernel up to 32 rows, widened off"),
    (fastest("library", "kernel"), (0, 0), "kernel off, widened off"),
    ({32: {"kernel": 2.0, "library": 2.0}}, (0, 0), "kernel off"),  # a tie is no win
    ({}, (0, 0), None),  # not timed: neither the kernel nor widening applies
])
def test_prompts_go_through_the_fastest_way_up_to_the_rows_where_it_was(monkeypatch, times,
                                                                        limits, described):
    monkeypatch.setattr(cpu_decoding, "_choices", {})
    monkeypatch.setattr(cpu_decoding, "_time_prefill", lambda model: dict(times))
    choice = cpu_decoding.choice_for(GPT2(CONFIG).eval())
    assert (choice.prefill_rows, choice.prefill_wide_rows) == limits
    assert choice.prefill_times_ms == times
    if described is None:
        assert "prompt through" not in choice.describe()
    else:
        assert described in choice.describe()


def test_prompt_products_are_timed_each_way_that_applies(every_product_way):
    kernel = row_kernels.load() is None
    with torch.no_grad():
        timed = {kind: cpu_decoding._time_prefill(model) for kind, model in [
            ("float32", GPT2(CONFIG).eval()),
            ("bfloat16", GPT2(CONFIG).eval().to(torch.bfloat16)),
            ("int8", gpt2_decl.quantize(GPT2(CONFIG).eval(), "int8")),
            ("int8-dynamic", gpt2_decl.quantize(GPT2(CONFIG).eval(), "int8-dynamic"))]}
    assert timed["int8-dynamic"] == {}  # its products round their input to int8 first
    assert timed["float32"] == {} or kernel  # float32 weights are wide already
    for kind, widened in (("float32", False), ("bfloat16", True), ("int8", True)):
        if not timed[kind]:
            continue
        assert list(timed[kind]) == list(cpu_decoding.PREFILL_ROWS)
        ways = {"library", *(["kernel"] if kernel else []), *(["wide"] if widened else [])}
        for times in timed[kind].values():
            assert set(times) == ways and all(0 < ms < 10_000 for ms in times.values())


def test_packed_products_step_matches_eager_and_leaves_the_weights_alone():
    rows = 1  # a batch of rows: the generation test below
    model = GPT2(CONFIG).eval()
    before = {name: parameter.clone() for name, parameter in model.named_parameters()}
    decoding = CpuDecoding(one_row_products=False, packed_products=True)
    step = gpt2_decl.compile(model, backend=decoding.backend, freeze=decoding.freezes)
    prompt = torch.randint(CONFIG.vocab_size, (rows, 6), generator=torch.Generator().manual_seed(2))
    logits = {}
    with torch.no_grad():
        for name, run in [("eager", model), ("compiled", step)]:
            cache = KVCache(CONFIG, rows, CONFIG.n_ctx, dtype=model.dtype, device=model.device)
            model(prompt[:, :-1], cache)
            logits[name] = run(prompt[:, -1:], cache, check_values=False)
    assert (logits["compiled"] - logits["eager"]).abs().max() <= 1e-5
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_choice_is_measured_once_per_kind_of_model(monkeypatch):
    monkeypatch.setattr(cpu_decoding, "_choices", {})
    timed = []
    real = cpu_decoding._time_products
    monkeypatch.setattr(cpu_decoding, "_time_products",
                        lambda model, rows: timed.append(model) or real(model, rows))
    first, same_kind = GPT2(CONFIG).eval(), GPT2(CONFIG).eval()
    choice = cpu_decoding.choice_for(first)
    assert cpu_decoding.choice_for(same_kind) is choice
    assert cpu_decoding.choice_for(GPT2(CONFIG).eval().to(torch.bfloat16)) is not choice
    assert len(timed) == 2
    for with_it, without in choice.times_ms.values():  # real times, of work really done
        assert 0 < with_it < 10_000 and 0 < without < 10_000


@pytest.mark.parametrize(("way", "freezes"), [
    ("packed_products", True),
    pytest.param("kernel_products", False, marks=pytest.mark.skipif(
        row_kernels.load() is not None, reason=f"no row kernel here: {row_kernels.load()}")),
])
def test_generation_with_each_way_of_products_decodes_as_eager_and_sees_weights_changed(
        monkeypatch, way, freezes):
    # The way made to win the timing, so that generation compiles it.
    monkeypatch.setattr(cpu_decoding, "_choices", {})
    monkeypatch.setattr(cpu_decoding, "_time_products", lambda model, rows: {
        "one_row_products": (2.0, 1.0), way: (0.5, 1.0)})
    model = GPT2(CONFIG).eval()
    prompt = torch.randint(CONFIG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    decoding = cpu_decoding.choice_for(model, rows=2).decoding
    assert getattr(decoding, way) and decoding.freezes == freezes
    assert torch.equal(model.generate(prompt, 8, greedy=True, compile=True),
                       model.generate(prompt, 8, greedy=True))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(-1.5)
    # A frozen step holds the old weights: generation compiles one without them (the kernel
    # reads the weights as they are at each step).
    assert torch.equal(model.generate(prompt, 8, greedy=True, compile=True),
                       model.generate(prompt, 8, greedy=True))
