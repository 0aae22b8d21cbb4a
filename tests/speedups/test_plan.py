"""Speed-up plans: saved and loaded whole, refused in one line where they do not apply, and
applied without timing anything, the same way every time."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch
from helpers import reference_logits
from torch._inductor.select_algorithm import AlgorithmSelectorCache

import gpt2_decl
from gpt2_decl import GPT2
from gpt2_decl.core import timing
from gpt2_decl.speedups import Plan, PlanError
from gpt2_decl.speedups.machine import this_machine
from gpt2_decl.speedups.plan import Choice, describe_model


def plan_for(model, batch=1, used=(), decoding=True, **changes) -> Plan:
    names = ("upcast_products", "padded_vocab", "gemm_template", "gemv_kernel", "upcast_attention",
             "upcast_prompt", "gemv_prompt")
    choices = tuple(Choice(name, name in used, {"ours": 1.0, "library": 2.0}) for name in names)
    plan = Plan(describe_model(model), batch, 16, this_machine(), choices, decoding)
    return dataclasses.replace(plan, **changes)


@pytest.fixture
def no_timing(monkeypatch):
    """Applying a plan must time nothing: neither our timing nor inductor's autotuning."""
    def refuse(*args, **kwargs):
        raise AssertionError("a plan timed something while being applied")

    monkeypatch.setattr(timing, "time_in_turns", refuse)
    monkeypatch.setattr(AlgorithmSelectorCache, "benchmark_choices", refuse)


def test_a_saved_plan_loads_equal_and_reads_as_json(tmp_path, tiny_model):
    plan = plan_for(tiny_model, batch=2, used=("gemm_template",))
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["batch"] == 2 and data["model"]["n_layer"] == tiny_model.config.n_layer
    used = [choice["used"] for choice in data["choices"]]
    assert used == [False, False, True, False, False, False, False]


def test_the_description_names_the_model_the_machine_and_every_choice(tiny_model):
    text = plan_for(tiny_model, used=("gemv_kernel",)).describe()
    assert "n_layer=2" in text and this_machine()["cpu"] in text
    assert "gemv_kernel: on (ours 1.00 ms, library 2.00 ms)" in text
    assert "gemm_template: off" in text


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not a speed-up plan: not JSON"),
    ('{"format": "something else"}', re.escape('is not a speed-up plan (no "format"')),
    ('[1, 2]', "is not a speed-up plan"),
])
def test_a_file_that_is_not_a_plan_is_one_line(tmp_path, content, message):
    (tmp_path / "plan.json").write_text(content)
    with pytest.raises(PlanError, match=message) as error:
        Plan.load(tmp_path / "plan.json")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage, message", [
    (lambda data: data.pop("machine"), "damaged speed-up plan .KeyError"),
    (lambda data: data.update(batch=0), "damaged speed-up plan .ValueError: expected a positive"),
    (lambda data: data["choices"][0].update(used="yes"), "expected true or false"),
    (lambda data: data["choices"][0].update(name="warp_drive"), "does not have: warp_drive"),
    (lambda data: data.update(version=99), "version 99"),
])
def test_a_damaged_plan_is_one_line(tmp_path, tiny_model, damage, message):
    data = plan_for(tiny_model).to_dict()
    damage(data)
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message) as error:
        Plan.load(tmp_path / "plan.json")
    assert "\n" not in str(error.value)


def test_a_missing_plan_file_is_one_line(tmp_path):
    with pytest.raises(PlanError, match="cannot read the plan .*No such file"):
        Plan.load(tmp_path / "nowhere.json")


@pytest.mark.parametrize("change, message", [
    (lambda plan: dataclasses.replace(plan, model={**plan.model, "n_layer": 12}),
     "made for a model with n_layer=12, not 2"),
    (lambda plan: dataclasses.replace(plan, model={**plan.model, "dtype": "bfloat16"}),
     "made for a model with dtype=bfloat16, not float32"),
    (lambda plan: dataclasses.replace(plan, model={**plan.model, "weights": "int8"}),
     "made for a model with weights=int8, not float"),
    (lambda plan: dataclasses.replace(plan, machine={**plan.machine, "cpu": "Another CPU"}),
     "made on a machine with cpu Another CPU"),
    (lambda plan: dataclasses.replace(plan, machine={**plan.machine, "features": ["amx_bf16"]}),
     "made on a machine with features amx_bf16"),
])
def test_a_plan_for_another_model_or_machine_is_refused_in_one_line(tiny_model, change, message):
    plan = change(plan_for(tiny_model))
    with pytest.raises(PlanError, match=message) as error:
        gpt2_decl.compile(tiny_model, plan=plan)
    assert "\n" not in str(error.value)


def test_a_plan_for_another_batch_is_refused_when_called(tiny_model):
    compiled = gpt2_decl.compile(tiny_model, plan=plan_for(tiny_model, batch=2))
    with pytest.raises(PlanError, match="made for batch 2, not 3: tune one with batch=3"):
        compiled(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(PlanError, match="made for batch 2, not 1"):
        tiny_model.generate(torch.zeros(1, 4, dtype=torch.long), 2, plan=plan_for(tiny_model, 2))


def test_a_plan_is_for_a_cpu_model(tiny_config):
    with torch.device("meta"):
        model = GPT2(tiny_config)
    with pytest.raises(PlanError, match="for a model on the CPU; the model is on meta"):
        plan_for(model).check(model)


def test_a_plan_is_passed_alone_and_a_forward_plan_does_not_decode(tiny_model):
    with pytest.raises(ValueError, match="pass plan= alone"):
        gpt2_decl.compile(tiny_model, freeze=True, plan=plan_for(tiny_model))
    prompt = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="drop compile='inductor'"):
        tiny_model.generate(prompt, 2, compile="inductor", plan=plan_for(tiny_model))
    with pytest.raises(PlanError, match="tuned for forward passes only"):
        tiny_model.generate(prompt, 2, plan=plan_for(tiny_model, decoding=False))


# With nothing used, a plan's forward is the frozen compile that test_compile checks.
def test_a_planned_forward_equals_the_longhand_model_and_times_nothing(tiny_model, tokens,
                                                                       no_timing):
    plan = plan_for(tiny_model, 3, ("padded_vocab",))
    with torch.no_grad():
        logits = gpt2_decl.compile(tiny_model, plan=plan)(tokens)
    vocab = tiny_model.config.vocab_size  # 97: padded to 112
    assert logits.shape == (*tokens.shape, vocab) and logits.stride()[-2:] == (112, 1)
    assert torch.allclose(logits, reference_logits(tiny_model, tokens), atol=1e-5)
    assert logits.view(-1, vocab).shape == (tokens.numel(), vocab)


def test_upcast_bfloat16_forward_is_within_bfloat16_rounding_of_float64(tiny_config, tokens,
                                                                          no_timing):
    model = GPT2(tiny_config).to(torch.bfloat16).eval()
    exact = reference_logits(GPT2(tiny_config).double().eval(), tokens)
    with torch.no_grad():
        # Both, as tune picks them for bfloat16: the padded head's product is upcast too.
        used = ("upcast_products", "padded_vocab")
        planned = gpt2_decl.compile(model, plan=plan_for(model, 3, used=used))
        upcast, library = planned(tokens).double(), model(tokens).double()
    # The upcast products round once where the library's bfloat16 ones round the same way.
    assert (upcast - exact).abs().max() <= 1.5 * (library - exact).abs().max() + 1e-2


# With nothing used, a plan's step is the same backend rewriting nothing, with the options
# that both cases below also take.
@pytest.mark.parametrize("used", [("gemm_template", "upcast_attention", "upcast_prompt"),
                                  ("gemv_kernel", "gemv_prompt")])
def test_planned_generation_equals_eager_and_times_nothing(tiny_model, used, no_timing):
    prompt = torch.randint(tiny_model.config.vocab_size, (2, 5),
                           generator=torch.Generator().manual_seed(3))
    eager = tiny_model.generate(prompt, 6, greedy=True)
    planned = tiny_model.generate(prompt, 6, greedy=True, plan=plan_for(tiny_model, 2, used))
    assert torch.equal(planned, eager)


def test_a_step_through_the_kernel_refuses_weights_changed_since_it_froze_them(tiny_config):
    model = GPT2(tiny_config).eval()
    # The sizes of the planned generation above, whose compiled step this one reuses.
    plan = plan_for(model, 2, ("gemv_kernel",))
    prompt = torch.randint(tiny_config.vocab_size, (2, 5),
                           generator=torch.Generator().manual_seed(4))
    model.generate(prompt, 6, greedy=True, plan=plan)
    with torch.no_grad():
        model.blocks[0].mlp.up.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="changed in place after a compiled step froze"):
        model.generate(prompt, 6, greedy=True, plan=plan)


# Loads a saved plan in a fresh process and generates with it and with a plain compile.
GENERATE = """
import json, sys, torch
from gpt2_decl import GPT2, GPT2Config
from gpt2_decl.speedups import Plan
model = GPT2(GPT2Config(**json.loads(sys.argv[2]))).eval()
prompt = torch.randint(model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
def sampled():
    return dict(top_k=20, generator=[torch.Generator().manual_seed(row) for row in range(2)])
print(json.dumps({"plain": model.generate(prompt, 12, compile=True, **sampled()).tolist(),
                  "plan": model.generate(prompt, 12, plan=Plan.load(sys.argv[1]),
                                         **sampled()).tolist()}))
"""


@pytest.mark.slow
def test_a_saved_plan_and_a_plain_compile_give_the_same_tokens_in_another_process(tmp_path):
    settings = dict(vocab_size=97, n_ctx=32, d_model=48, n_layer=2, n_head=4, seed=1)
    model = GPT2(gpt2_decl.GPT2Config(**settings)).eval()
    path = tmp_path / "plan.json"
    plan_for(model, 2, ("gemv_kernel", "upcast_attention")).save(path)
    prompt = torch.randint(97, (2, 8), generator=torch.Generator().manual_seed(0))

    def sampled():
        return dict(top_k=20, generator=[torch.Generator().manual_seed(row) for row in range(2)])

    here = {"plain": model.generate(prompt, 12, compile=True, **sampled()).tolist(),
            "plan": model.generate(prompt, 12, plan=Plan.load(path), **sampled()).tolist()}
    done = subprocess.run([sys.executable, "-c", GENERATE, str(path), json.dumps(settings)],
                          text=True, capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == here
    # Sampled with one seeded generator per row, compiled or not, plan or not: the same draws.
    eager = model.generate(prompt, 12, **sampled()).tolist()
    assert here["plain"] == eager and here["plan"] == eager
