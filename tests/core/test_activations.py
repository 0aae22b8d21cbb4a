"""Capturing and patching named activations, eager and compiled: the names, what each holds
(against longhand formulas), exact sums, patches, padded batches, gradients, and bad input."""

import math

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import gpt2_decl
from gpt2_decl import GPT2, GPT2Config, KVCache, Patch, ShapeError
from gpt2_decl.core.activations import ALIASES, OTHER_LAYOUT

CONFIG = GPT2Config(vocab_size=97, n_ctx=32, d_model=48, n_layer=2, n_head=4, seed=1)
BLOCK = ["resid_pre", "attn_in", "q", "k", "v", "scores", "pattern", "z", "attn_out",
         "resid_mid", "mlp_in", "mlp_pre", "mlp_post", "mlp_out", "resid_post"]


@pytest.fixture
def model():
    return GPT2(CONFIG).eval()


@pytest.fixture
def tokens():
    return torch.randint(CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


def layer_norm(x, module):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + CONFIG.layer_norm_eps) * module.weight + module.bias


def test_every_name_of_every_block_and_of_the_model_in_order(model, tokens):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    expected = ["embed", "pos_embed", *(f"blocks.{i}.{site}" for i in range(2) for site in BLOCK),
                "resid_final", "ln_final", "logits"]
    assert list(cache) == expected


def test_eager_capture_leaves_the_logits_bit_identical_and_the_residual_sums_exact(model, tokens):
    with torch.no_grad():
        plain = model(tokens)
        logits, cache = model.run_with_cache(tokens, lambda name: "pattern" not in name
                                             and "scores" not in name)
    assert torch.equal(logits, plain) and torch.equal(cache["logits"], plain)
    for i in range(CONFIG.n_layer):
        block = {site: cache[f"blocks.{i}.{site}"] for site in BLOCK if site not in
                 ("scores", "pattern")}
        assert torch.equal(block["resid_pre"] + block["attn_out"], block["resid_mid"])
        assert torch.equal(block["resid_mid"] + block["mlp_out"], block["resid_post"])
    assert torch.equal(cache["embed"] + cache["pos_embed"], cache["blocks.0.resid_pre"])
    assert torch.equal(cache["blocks.1.resid_post"], cache["resid_final"])


def test_each_activation_is_what_the_longhand_model_computes(model, tokens):
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        block, c = model.blocks[0], {site: cache[f"blocks.0.{site}"] for site in BLOCK}
        embedded = model.token_embedding.weight[tokens] + model.position_embedding.weight[:9]
        assert torch.allclose(c["attn_in"], layer_norm(embedded, block.ln_1), atol=1e-6)
        qkv = c["attn_in"] @ block.attn.qkv.weight.T + block.attn.qkv.bias
        q, k, v = (t.reshape(2, 9, 4, 12).transpose(1, 2) for t in qkv.split(48, dim=-1))
        for name, by_hand in (("q", q), ("k", k), ("v", v)):
            assert torch.allclose(c[name], by_hand, atol=1e-6), name
        scores = q @ k.transpose(-1, -2) / math.sqrt(12)
        hidden = ~torch.ones(9, 9, dtype=torch.bool).tril()
        assert torch.allclose(c["scores"], scores.masked_fill(hidden, float("-inf")), atol=1e-6)
        assert (c["pattern"][..., hidden] == 0).all()
        assert torch.allclose(c["pattern"].sum(-1), torch.ones(2, 4, 9), atol=1e-6)
        assert torch.allclose(c["z"], c["pattern"] @ v, atol=1e-6)
        merged = c["z"].transpose(1, 2).reshape(2, 9, 48)
        assert torch.allclose(c["attn_out"], merged @ block.attn.proj.weight.T
                              + block.attn.proj.bias, atol=1e-6)
        gelu = 0.5 * c["mlp_pre"] * (1 + torch.tanh(math.sqrt(2 / math.pi) * (
            c["mlp_pre"] + 0.044715 * c["mlp_pre"] ** 3)))
        assert torch.allclose(c["mlp_post"], gelu, atol=1e-6)
        assert torch.allclose(cache["ln_final"], layer_norm(cache["resid_final"], model.ln_f),
                              atol=1e-6)
        assert torch.allclose(logits, cache["ln_final"] @ model.token_embedding.weight.T,
                              atol=1e-5)


def test_patterns_are_computed_only_where_asked_and_keep_the_logits(model, tokens, monkeypatch):
    from gpt2_decl.core import layers

    calls = []
    for name in ("attend", "attention_scores"):
        function = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *args, name=name, function=function, **kw: (
            calls.append(name), function(*args, **kw))[1])
    with torch.no_grad():
        plain = model(tokens)
        assert calls == ["attend", "attend"]
        logits, cache = model.run_with_cache(tokens, "blocks.1.pattern")
    assert calls[2:] == ["attend", "attention_scores"]  # block 0 fused, block 1 explicit
    assert list(cache) == ["blocks.1.pattern"]
    assert (logits - plain).abs().max() <= 1e-5


def test_transformer_lens_names_are_aliases_of_ours(model, tokens):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, ["blocks.1.attn.hook_pattern",
                                                 "blocks.0.ln1.hook_normalized", "hook_embed"])
    assert list(cache) == ["embed", "blocks.0.attn_in", "blocks.1.pattern"]
    assert cache["blocks.1.attn.hook_pattern"] is cache["blocks.1.pattern"]


def test_transformer_lens_names_for_another_layout_are_refused_naming_ours(model, tokens):
    message = ("blocks.1.attn.hook_z is TransformerLens' z, laid out batch pos head_index "
               r"d_head; ours is blocks.1.z, laid out batch head seq d_head")
    with pytest.raises(ValueError, match=message):
        model.run_with_cache(tokens, "blocks.1.attn.hook_z")
    with pytest.raises(ValueError, match="ours is blocks.0.q"):
        model.run_with_patches(tokens, {"blocks.0.attn.hook_q": torch.zeros(2, 9, 4, 12)})
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, "blocks.1.z")
    with pytest.raises(KeyError, match=message):
        cache["blocks.1.attn.hook_z"]


def test_each_alias_holds_what_transformer_lens_captures_under_that_name(model, tokens):
    pytest.importorskip("transformer_lens.model_bridge")
    from gpt2_decl.bench.capture import transformer_lens_copy

    with torch.no_grad():
        lens_logits, lens_cache = transformer_lens_copy(model).run_with_cache(tokens)
        logits, cache = model.run_with_cache(tokens)
    assert (logits - lens_logits).abs().max() <= 1e-5
    pairs = [(alias.replace("{i}", str(i)), name.replace("{i}", str(i)))
             for alias, name in ALIASES.items() for i in range(CONFIG.n_layer)]
    # q, k, v, z: in TransformerLens' layout, the position before the head.
    pairs += [(f"blocks.{i}.{alias}", f"blocks.{i}.{site}") for alias, site in OTHER_LAYOUT.items()
              for i in range(CONFIG.n_layer)]
    assert len(dict(pairs)) == 3 + 15 * CONFIG.n_layer  # 3 of the model's 5 names, all 15 a block
    for alias, name in dict(pairs).items():
        theirs, ours = lens_cache[alias], cache[name]
        if alias.endswith(tuple(OTHER_LAYOUT)):
            theirs = theirs.transpose(1, 2)
        masked = ours == -math.inf  # scores: TransformerLens masks with the dtype's lowest
        assert (theirs[masked] <= torch.finfo(theirs.dtype).min / 2).all(), name
        assert (ours[~masked] - theirs[~masked]).abs().max() <= 1e-5, name


def test_the_cache_stacks_accumulates_and_splits_by_head(model, tokens):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    assert torch.equal(cache.stack("resid_post")[1], cache["blocks.1.resid_post"])
    resid = cache.accumulated_resid()
    assert resid.shape == (3, 2, 9, 48) and torch.equal(resid[-1], cache["resid_final"])
    heads = cache.head_contributions(1)  # [batch, seq, head, d_model]
    assert heads.shape == (2, 9, 4, 48)
    assert torch.allclose(heads.sum(2) + model.blocks[1].attn.proj.bias,
                          cache["blocks.1.attn_out"], atol=1e-6)


@pytest.mark.parametrize("names, message", [
    ("blocks.1.resid_pst", "did you mean blocks.1.resid_post"),
    ("blocks.1.hook_resid_pr", "did you mean blocks.1.hook_resid_pre,"),
    ("blocks.5.q", "names block 5, but the model has blocks 0 to 1"),
    ("blocks.*.nothing", "no activation is named 'blocks.*.nothing'"),
    (lambda name: False, "the predicate given to capture accepts no activation name"),
])
def test_an_unknown_name_is_one_line_naming_the_closest(model, tokens, names, message):
    with pytest.raises(ValueError, match=message) as error:
        model.run_with_cache(tokens, names)
    assert "\n" not in str(error.value)


def test_names_and_dtypes_of_the_wrong_kind_are_one_line(model, tokens):
    with pytest.raises(TypeError, match="names to capture: expected a name, a glob, a list of "
                                        "them, a predicate or None, got int"):
        model.run_with_cache(tokens, 3)
    with pytest.raises(TypeError, match="expected a torch.dtype .* got 'float16'"):
        model.run_with_cache(tokens, "blocks.0.q", dtype="float16")


def test_positions_dtype_and_device_are_how_captures_are_kept(model, tokens):
    with torch.no_grad():
        _, whole = model.run_with_cache(tokens, ["blocks.0.resid_post", "blocks.0.pattern"])
        _, some = model.run_with_cache(tokens, ["blocks.0.resid_post", "blocks.0.pattern"],
                                       positions=[-1, 2], dtype=torch.float64, device="cpu")
    assert torch.equal(some["blocks.0.resid_post"],
                       whole["blocks.0.resid_post"][:, [8, 2]].double())
    assert torch.equal(some["blocks.0.pattern"], whole["blocks.0.pattern"][:, :, [8, 2]].double())


def test_positions_as_booleans_pick_where_true_for_capture_and_patches(model, tokens):
    chosen = [False, True, False, False, True, False, False, False, True]
    with torch.no_grad():
        _, whole = model.run_with_cache(tokens, "blocks.0.resid_post")
        for positions in (chosen, torch.tensor(chosen), np.array(chosen)):
            _, some = model.run_with_cache(tokens, "blocks.0.resid_post", positions=positions)
            assert torch.equal(some["blocks.0.resid_post"],
                               whole["blocks.0.resid_post"][:, [1, 4, 8]])
        by_mask = model.run_with_patches(tokens, {"blocks.0.mlp_out": Patch(0.0, positions=chosen)})
        by_index = model.run_with_patches(tokens, {"blocks.0.mlp_out": Patch(0.0, [1, 4, -1])})
        per_row = [[False] * 9, chosen]
        by_row = [model.run_with_patches(tokens, {"blocks.0.mlp_out": Patch(0.0, rows)})
                  for rows in (per_row, np.array(per_row), torch.tensor(per_row))]
    assert torch.equal(by_mask, by_index)
    assert all(torch.equal(logits[1], by_index[1]) for logits in by_row)
    assert all(torch.equal(logits, by_row[0]) for logits in by_row)


@pytest.mark.parametrize("positions, error, message", [
    ([1.7], TypeError, "positions must be an int, a list of ints, a slice or booleans, got 1.7"),
    (torch.tensor([0.5]), TypeError, "positions as a tensor must be one axis of integers"),
    ([True, False], ShapeError, r"positions as booleans must be one per seq \(9\), got 2"),
    ([2, -10], ValueError, "positions -10 is out of range for seq of size 9"),
    ([], ValueError, r"positions \[\] pick no position of a sequence of 9"),
    ({1, 2}, TypeError, "positions must be an int, a list of ints, a slice or booleans, got set"),
    (slice(None, None, 0), ValueError, r"positions slice\(None, None, 0\) has a step of 0"),
])
def test_bad_capture_positions_are_one_line(model, tokens, positions, error, message):
    with pytest.raises(error, match=message) as raised:
        model.run_with_cache(tokens, "blocks.0.resid_post", positions=positions)
    assert "\n" not in str(raised.value)


def test_patching_with_its_own_value_changes_nothing(model, tokens):
    with torch.no_grad():
        plain = model(tokens)
        _, cache = model.run_with_cache(tokens, "blocks.1.mlp_post")
        same = model.run_with_patches(tokens, {"blocks.1.mlp_post": cache["blocks.1.mlp_post"]})
        # A pattern patched makes its block compute attention explicitly: as close as capture.
        _, cache = model.run_with_cache(tokens, "blocks.0.pattern")
        explicit = model.run_with_patches(tokens, {"blocks.0.pattern": cache["blocks.0.pattern"]})
    assert torch.equal(same, plain)
    assert (explicit - plain).abs().max() <= 1e-5


def test_the_clean_residual_patched_into_the_corrupted_run_gives_the_clean_logits(model):
    clean = torch.randint(97, (1, 9), generator=torch.Generator().manual_seed(1))
    corrupted = clean.clone()
    corrupted[0, 3] = (clean[0, 3] + 1) % 97
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean, "blocks.0.resid_pre")
        patched = model.run_with_patches(corrupted,
                                         {"blocks.0.resid_pre": cache["blocks.0.resid_pre"]})
        assert not torch.equal(model(corrupted), clean_logits)
    assert torch.equal(patched, clean_logits)


def test_a_head_ablated_at_some_positions_is_removed_from_attn_out_there_only(model, tokens):
    with torch.no_grad():
        _, plain = model.run_with_cache(tokens, ["blocks.0.z", "blocks.0.attn_out"])
        _, ablated = model.run_with_cache(tokens, ["blocks.0.z", "blocks.0.attn_out"], patches={
            "blocks.0.z": Patch(0.0, heads=[2], positions=[4, 5])})
    z = plain["blocks.0.z"].clone()
    z[:, 2, 4:6] = 0
    assert torch.equal(ablated["blocks.0.z"], z)
    proj = model.blocks[0].attn.proj
    by_hand = z.transpose(1, 2).reshape(2, 9, 48) @ proj.weight.T + proj.bias
    assert torch.allclose(ablated["blocks.0.attn_out"], by_hand, atol=1e-6)
    untouched = [0, 1, 2, 3, 6, 7, 8]
    assert torch.equal(ablated["blocks.0.attn_out"][:, untouched],
                       plain["blocks.0.attn_out"][:, untouched])


def test_a_function_patches_what_it_is_given(model, tokens):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, ["blocks.1.resid_mid", "blocks.1.resid_post"],
                                        patches={"blocks.1.mlp_out": torch.zeros_like})
    assert torch.equal(cache["blocks.1.resid_post"], cache["blocks.1.resid_mid"])


@pytest.mark.parametrize("patch, error, message", [
    (torch.zeros(2, 9, 47), ShapeError,
     r"blocks.0.attn_out: expected a value of shape \[2, 9, 48\]"),
    (torch.zeros(2, 9, 48, dtype=torch.float64), TypeError, "expected dtype float32, got float64"),
    (Patch(0.0, heads=[0]), ValueError, "heads= is for activations with a head axis"),
    (Patch(0.0, positions=[9]), ValueError, "positions 9 is out of range for seq of size 9"),
    (Patch(0.0, positions=[False] * 9), ValueError, "pick none of the 9 along seq"),
    ("zeros", TypeError, "expected a tensor, a function of the activation or gpt2_decl.Patch"),
])
def test_a_bad_patch_is_one_line_naming_the_activation(model, tokens, patch, error, message):
    with pytest.raises(error, match=message) as raised:
        model.run_with_patches(tokens, {"blocks.0.attn_out": patch})
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("function, error, message", [
    (lambda x: x[..., :40], ShapeError,
     r"must return batch seq d_model = \[2, 9, 48\], got \[2, 9, 40\]"),
    (lambda x: x.double(), TypeError, "must return float32 on cpu, got float64 on cpu"),
    (lambda x: None, TypeError, "must return a tensor, got NoneType"),
])
def test_a_function_patch_giving_the_wrong_thing_is_one_line_eager_and_compiled(
        model, tokens, function, error, message):
    for runner in (model, gpt2_decl.compile(model, backend=CompileCounter())):
        expected = f"patch of blocks.1.mlp_out: the function {message}"
        with pytest.raises(error, match=expected) as raised:
            runner.run_with_patches(tokens, {"blocks.1.mlp_out": function})
        assert "\n" not in str(raised.value)
    # A pass that fails partway leaves a cache it was continuing as it was.
    cache = KVCache(CONFIG, 2, 12, dtype=torch.float32, device="cpu")
    with pytest.raises(error, match=expected):
        model.run_with_patches(tokens, {"blocks.1.mlp_out": function}, cache=cache)
    assert int(cache.length) == 0


def test_heads_out_of_range_are_refused(model, tokens):
    with pytest.raises(ValueError, match="heads 4 is out of range for head of size 4"):
        model.run_with_patches(tokens, {"blocks.0.z": Patch(0.0, heads=[4])})


def test_what_capture_cannot_do_is_refused_in_one_line(model, tokens):
    with pytest.raises(ValueError, match="drop last_only"):
        model.run_with_cache(tokens, last_only=True)
    cache = KVCache(CONFIG, 2, 12, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        model(tokens, cache)
        with pytest.raises(ValueError, match="blocks.0.pattern: a pass that continues a cache "
                                             "has no full sequence"):
            model.run_with_cache(tokens[:, :1], "blocks.0.pattern", cache=cache)
        step, captured = model.run_with_cache(tokens[:, :1], "blocks.*.resid_post", cache=cache)
    assert captured["blocks.1.resid_post"].shape == (2, 1, 48)


def test_a_prompt_into_an_empty_cache_gives_its_pattern_over_the_cache_slots(model, tokens):
    cache = KVCache(CONFIG, 2, 12, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        _, alone = model.run_with_cache(tokens, "blocks.1.pattern")
        _, cached = model.run_with_cache(tokens, "blocks.1.pattern", cache=cache)
    pattern = cached["blocks.1.pattern"]
    assert pattern.shape == (2, 4, 9, 12) and (pattern[..., 9:] == 0).all()
    assert torch.allclose(pattern[..., :9], alone["blocks.1.pattern"], atol=1e-6)


def test_each_row_of_a_left_padded_batch_gets_the_activations_it_has_alone(model):
    rows = [[5, 17, 60, 2], [9, 8, 7, 6, 5, 4, 3]]
    padded = torch.tensor([[0] * 3 + rows[0], rows[1]])
    mask = torch.tensor([[0] * 3 + [1] * 4, [1] * 7])
    names = ["pos_embed", "blocks.1.pattern", "blocks.1.resid_post", "logits"]
    with torch.no_grad():
        _, together = model.run_with_cache(padded, names, attention_mask=mask)
        for index, row in enumerate(rows):
            _, alone = model.run_with_cache(torch.tensor([row]), names)
            real = slice(7 - len(row), 7)
            for name in ("pos_embed", "blocks.1.resid_post", "logits"):
                assert torch.allclose(together[name][index, real], alone[name][0],
                                      atol=1e-5), name
            assert torch.allclose(together["blocks.1.pattern"][index, :, real, real],
                                  alone["blocks.1.pattern"][0], atol=1e-6)


def test_patches_reach_each_row_of_a_left_padded_batch_as_they_would_alone(model):
    rows = [[5, 17, 60, 2], [9, 8, 7, 6, 5, 4, 3]]
    padded = torch.tensor([[0] * 3 + rows[0], rows[1]])
    mask = torch.tensor([[0] * 3 + [1] * 4, [1] * 7])
    # Negative positions name the same token of every row of a left-padded batch.
    patches = {"blocks.0.z": Patch(0.0, heads=[1], positions=[-1, -2]),
               "blocks.1.mlp_out": lambda x: 2 * x}
    counter = CompileCounter()
    with torch.no_grad():
        together = model.run_with_patches(padded, patches, attention_mask=mask)
        compiled = gpt2_decl.compile(model, backend=counter).run_with_patches(
            padded, patches, attention_mask=mask)
        for index, row in enumerate(rows):
            alone = model.run_with_patches(torch.tensor([row]), patches)
            assert not torch.allclose(alone, model(torch.tensor([row])), atol=1e-3)
            assert torch.allclose(together[index, -len(row):], alone[0], atol=1e-5)
    assert counter.frame_count == 1 and torch.allclose(compiled, together, atol=1e-5)


def test_gradients_of_a_metric_come_from_the_same_run(model, tokens):
    logits, cache = model.run_with_cache(tokens, ["resid_final"], gradients=True)
    metric = logits[:, -1, 5].sum()
    metric.backward()
    # By hand: the metric as a function of the last residual stream, through LayerNorm and
    # the unembedding.
    resid = cache["resid_final"].detach().requires_grad_()
    by_hand = (layer_norm(resid, model.ln_f) @ model.token_embedding.weight.T)[:, -1, 5].sum()
    [expected] = torch.autograd.grad(by_hand, resid)
    assert torch.allclose(cache.grad("resid_final"), expected, atol=1e-6)


def test_typechecked_mode_checks_what_a_function_patch_gives(model, tokens):
    with gpt2_decl.typechecked(), pytest.raises(ShapeError, match="blocks.1.mlp_out"):
        model.run_with_patches(tokens, {"blocks.1.mlp_out": lambda x: x[..., :40]})


def test_compiled_capture_is_one_graph_matching_eager_and_patches_never_recompile(model, tokens):
    counter = CompileCounter()
    compiled = gpt2_decl.compile(model, backend=counter)
    with torch.no_grad():
        eager_logits, eager = model.run_with_cache(tokens)
        logits, cache = compiled.run_with_cache(tokens)
        assert counter.frame_count == 1
        assert (logits - eager_logits).abs().max() <= 1e-5
        assert all(torch.allclose(cache[name], eager[name], atol=1e-5) for name in eager)
        for patch in (Patch(0.0, heads=[1]), Patch(torch.randn(2, 4, 9, 12), positions=[3, 4],
                                                    heads=[0, 2]), torch.zeros(2, 4, 9, 12)):
            compiled.run_with_patches(tokens, {"blocks.0.z": patch})
        assert counter.frame_count == 2  # one graph for the patches, whatever they put in
        compiled.run_with_cache(tokens, "blocks.*.resid_post", positions=[1])
        compiled.run_with_cache(tokens, "blocks.*.resid_post", positions=[4])
        assert counter.frame_count == 3
        explanation = torch._dynamo.explain(model)(tokens, taps=_taps(model, tokens))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


def test_a_function_patch_reuses_its_graph_for_new_tensors_it_closes_over(model, tokens):
    counter = CompileCounter()
    compiled = gpt2_decl.compile(model, backend=counter)
    with torch.no_grad():
        for scale in (torch.tensor(0.5), torch.tensor(2.0)):
            patches = {"blocks.1.mlp_out": lambda x, scale=scale: x * scale}
            patched = compiled.run_with_patches(tokens, patches)
            expected = model.run_with_patches(tokens, patches)
            assert torch.allclose(patched, expected, atol=1e-5)
        assert counter.frame_count == 1


def test_a_function_patch_that_runs_eagerly_but_cannot_compile_says_so_in_one_line(model, tokens):
    compiled = gpt2_decl.compile(model, backend=CompileCounter())
    branching = {"blocks.1.mlp_out": lambda x: x * 2 if x.sum() > 0 else x}
    with torch.no_grad():
        model.run_with_patches(tokens, branching)
        with pytest.raises(RuntimeError, match="the function patches of blocks.1.mlp_out run "
                                               "eagerly but did not compile") as raised:
            compiled.run_with_patches(tokens, branching)
        assert "\n" not in str(raised.value)
        cache = KVCache(CONFIG, 2, 12, dtype=torch.float32, device="cpu")
        with pytest.raises(RuntimeError, match="did not compile"):
            compiled.run_with_patches(tokens, branching, cache=cache)
    assert int(cache.length) == 0  # the failed call left nothing in the cache


def test_nothing_to_capture_or_patch_runs_the_plain_graph(model, tokens):
    counter = CompileCounter()
    compiled = gpt2_decl.compile(model, backend=counter)
    with torch.no_grad():
        plain = compiled(tokens)
        logits, cache = compiled.run_with_cache(tokens, [])
        patched = compiled.run_with_patches(tokens, {})
    assert counter.frame_count == 1 and len(cache) == 0
    assert torch.equal(logits, plain) and torch.equal(patched, plain)


def _taps(model, tokens):
    from gpt2_decl.core.activations import Taps, all_names

    return Taps(capture=frozenset(all_names(model.config)))


def test_compiled_inductor_capture_of_everything_matches_eager(model, tokens):
    with torch.no_grad():
        eager_logits, eager = model.run_with_cache(tokens)
        logits, cache = gpt2_decl.compile(model).run_with_cache(tokens)
    assert (logits - eager_logits).abs().max() <= 1e-5
    for name in eager:
        assert torch.allclose(cache[name], eager[name], atol=1e-5), name
