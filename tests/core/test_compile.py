import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import gpt2_decl
from gpt2_decl import compile as compile_model
from gpt2_decl.core.compiling import CompiledGPT2


@pytest.mark.parametrize("typecheck", [False, True])
def test_whole_model_is_one_graph_with_no_breaks(tiny_model, tokens, typecheck):
    with gpt2_decl.typechecked(typecheck), torch.no_grad():
        explanation = torch._dynamo.explain(tiny_model)(tokens)
    assert explanation.graph_count == 1
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize("typecheck", [False, True])
def test_compiled_equals_eager_on_inductor(tiny_model, tokens, typecheck):
    with gpt2_decl.typechecked(typecheck), torch.no_grad():
        compiled = compile_model(tiny_model)
        torch.testing.assert_close(compiled(tokens), tiny_model(tokens), atol=1e-5, rtol=0)
        shorter = tokens[:, :7]
        torch.testing.assert_close(compiled(shorter), tiny_model(shorter), atol=1e-5, rtol=0)


def test_compiled_last_only_equals_eager(tiny_model, tokens):
    with torch.no_grad():
        compiled = compile_model(tiny_model)
        torch.testing.assert_close(
            compiled(tokens, last_only=True), tiny_model(tokens)[:, -1:], atol=1e-5, rtol=0
        )


def test_new_sequence_lengths_cost_at_most_one_extra_compilation(tiny_model):
    counter = CompileCounter()
    compiled = compile_model(tiny_model, backend=counter)
    with torch.no_grad():
        for seq in (5, 6, 9, 17, 32, 2):
            compiled(torch.zeros(2, seq, dtype=torch.long))
    assert counter.frame_count <= 2


def test_switching_typechecked_mode_does_not_recompile(tiny_model, tokens):
    counter = CompileCounter()
    compiled = compile_model(tiny_model, backend=counter)
    with torch.no_grad():
        compiled(tokens)
        with gpt2_decl.typechecked():
            compiled(tokens)
        compiled(tokens)
    assert counter.frame_count == 1


def test_boundary_checks_still_run_around_the_compiled_graph(tiny_model):
    compiled = compile_model(tiny_model, backend=CompileCounter())
    assert isinstance(compiled, CompiledGPT2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        compiled(torch.full((1, 3), 1000))
    with gpt2_decl.typechecked(), pytest.raises(gpt2_decl.ShapeError, match="argument 'tokens'"):
        compiled(torch.zeros(1, 3))


def test_compiled_training_step_updates_the_shared_parameters(tiny_config, tokens):
    model = gpt2_decl.GPT2(tiny_config).train()
    compiled = compile_model(model, backend="aot_eager")
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    loss = compiled(tokens).logsumexp(-1).mean()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before)


def test_unfrozen_graphs_read_the_weights_at_every_call(tiny_config, tokens):
    model = gpt2_decl.GPT2(tiny_config).eval()
    with torch.no_grad():
        compiled = compile_model(model)
        torch.testing.assert_close(compiled(tokens), model(tokens), atol=1e-5, rtol=0)
        model.blocks[0].mlp.up.weight.mul_(2.0)
        torch.testing.assert_close(compiled(tokens), model(tokens), atol=1e-5, rtol=0)


def test_freezing_folds_the_weights_even_after_the_model_was_compiled_unfrozen(tiny_config,
                                                                                tokens):
    model = gpt2_decl.GPT2(tiny_config).eval()
    with torch.no_grad():
        compile_model(model)(tokens)
        frozen = compile_model(model, freeze=True)
        before = frozen(tokens)  # a graph of its own, with packed weights
        torch.testing.assert_close(before, model(tokens), atol=1e-5, rtol=0)
        # Frozen matmul weights are packed copies, so the update is not seen.
        model.blocks[0].mlp.up.weight.mul_(2.0)
        assert torch.equal(frozen(tokens), before)


def test_compiling_frozen_again_after_the_weights_changed_is_refused(tiny_config, tokens):
    model = gpt2_decl.GPT2(tiny_config).eval()
    with torch.no_grad():
        compile_model(model, freeze=True)(tokens)
        compile_model(model, freeze=True)(tokens)  # unchanged: the same graphs serve
        model.blocks[0].mlp.up.weight.mul_(2.0)
        with pytest.raises(RuntimeError, match="changed in place after a compiled step froze"):
            compile_model(model, freeze=True)
        compile_model(model)  # unfrozen graphs read the weights at every call
        compile_model(copy.deepcopy(model), freeze=True)  # a copy holds no frozen graph
