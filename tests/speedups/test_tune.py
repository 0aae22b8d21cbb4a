"""`tune`: each speed-up timed against what it replaces and used only where it won, with the
timings kept; and what cannot be timed here said in the plan."""

import dataclasses

import pytest
import torch

from gpt2_decl import GPT2
from gpt2_decl.core import timing
from gpt2_decl.core.timing import Timing
from gpt2_decl.speedups import PlanError, gemv, tune


@pytest.fixture
def timings(monkeypatch):
    """Fake timing: set(ms) makes every way named like a key of `ms` (its first word) take
    that many milliseconds; what was timed is recorded."""
    timed: list[str] = []

    def set_times(**ms: float) -> list[str]:
        def fake(calls, device="cpu", *, runs, warmup=1):
            timed.extend(calls)
            return {name: Timing((ms[name.split()[0]],)) for name in calls}

        monkeypatch.setattr(timing, "time_in_turns", fake)
        return timed

    return set_times


def by_name(plan):
    return {choice.name: choice for choice in plan.choices}


@pytest.mark.parametrize("template, kernel, used", [
    (5.0, 3.0, "gemv_kernel"),      # only the kernel beats the library's 4 ms
    (2.0, 3.0, "gemm_template"),    # both do; the template is the faster
    (6.0, 7.0, None),               # neither does
])
def test_the_fastest_way_of_the_steps_products_that_beats_the_library_is_used(
        tiny_model, timings, template, kernel, used):
    timings(library=4.0, gemm_template=template, gemv_kernel=kernel, upcast=1.0, padded=4.0)
    choices = by_name(tune(tiny_model, batch=2, seq=8))
    assert [name for name in ("gemm_template", "gemv_kernel") if choices[name].used] == \
        ([used] if used else [])
    assert choices["gemm_template"].times_ms == {"gemm_template": template, "library": 4.0}
    assert choices["gemv_kernel"].times_ms == {"gemv_kernel": kernel, "library": 4.0}


def test_float32_weights_have_no_gemm_to_upcast_and_are_not_timed_for_it(tiny_model, timings):
    timed = timings(library=4.0, gemm_template=5.0, gemv_kernel=5.0, upcast=1.0, padded=4.0)
    choices = by_name(tune(tiny_model, batch=1, seq=8))
    assert not choices["upcast_products"].used and not choices["upcast_prompt"].used
    assert "float32 weights" in choices["upcast_products"].note
    assert not any(name.startswith("upcast block") for name in timed)
    assert choices["upcast_attention"].used  # 1 ms against the library's 4


def test_bfloat16_gemms_are_upcast_where_that_times_faster(tiny_config, timings):
    model = GPT2(tiny_config).to(torch.bfloat16).eval()
    timings(library=4.0, gemm_template=5.0, gemv_kernel=5.0, upcast=1.0, padded=4.0)
    choices = by_name(tune(model, batch=1, seq=8, decoding=False))
    # Two blocks' products at 1 ms each and the head's: (2 + 1) ms against (2 + 1) x 4 ms.
    assert choices["upcast_products"].used
    assert choices["upcast_products"].times_ms == {"upcast": 3.0, "library": 12.0}
    assert set(choices) == {"upcast_products", "padded_vocab"}  # forward passes only


@pytest.mark.parametrize("padded", [2.0, 6.0])
def test_the_heads_vocabulary_is_padded_where_that_times_faster(tiny_model, timings, padded):
    timed = timings(library=4.0, upcast=1.0, padded=padded)
    choice = by_name(tune(tiny_model, batch=1, seq=8, decoding=False))["padded_vocab"]
    assert choice.used == (padded < 4.0)
    assert choice.times_ms == {"padded": padded, "library": 4.0}
    assert timed == ["padded", "library"]  # float32: nothing upcast, only the head timed


def test_a_head_already_a_multiple_of_16_rows_is_neither_padded_nor_timed(tiny_config, timings):
    model = GPT2(dataclasses.replace(tiny_config, vocab_size=112)).eval()
    timed = timings(library=4.0, upcast=1.0, padded=1.0)
    choice = by_name(tune(model, batch=1, seq=8, decoding=False))["padded_vocab"]
    assert not choice.used and choice.times_ms == {} and "padded" not in timed
    assert choice.note == "float32 weights of 112 rows, 8 rows in: no head to pad"


@pytest.mark.parametrize("upcast, kernel, used", [
    (1.0, 2.0, "upcast_prompt"),    # both beat the library's 4 ms; upcast is the faster
    (2.0, 1.0, "gemv_prompt"),      # both do; the kernel is the faster
    (5.0, 6.0, None),               # neither does
])
def test_the_prompts_products_go_the_fastest_of_three_ways(tiny_config, timings, upcast, kernel,
                                                          used):
    model = GPT2(tiny_config).to(torch.bfloat16).eval()
    timings(library=4.0, gemm_template=5.0, gemv_kernel=kernel, upcast=upcast, padded=4.0)
    choices = by_name(tune(model, batch=2, seq=8))
    assert [name for name in ("upcast_prompt", "gemv_prompt") if choices[name].used] == \
        ([used] if used else [])
    # Two blocks' products and the head's, each timed way at its ms: 3 x ms for the model.
    assert choices["upcast_prompt"].times_ms == {"upcast": 3 * upcast, "library": 12.0}
    assert choices["gemv_prompt"].times_ms == {"gemv_kernel": 3 * kernel, "library": 12.0}


def test_without_a_compiler_the_kernel_is_left_out_in_one_line(tiny_model, timings,
                                                              monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    gemv.load.cache_clear()
    try:
        timings(library=4.0, gemm_template=5.0, gemv_kernel=1.0, upcast=1.0, padded=4.0)
        choices = by_name(tune(tiny_model, seq=8))
    finally:
        gemv.load.cache_clear()
    for kernel in choices["gemv_kernel"], choices["gemv_prompt"]:
        assert not kernel.used and kernel.times_ms == {}
        assert kernel.note == "no C++ compiler: $CXX='no-such-compiler' is not found"


def test_tune_is_for_a_cpu_model_and_sizes_that_fit(tiny_config, tiny_model):
    with torch.device("meta"):
        model = GPT2(tiny_config)
    with pytest.raises(PlanError, match="on the CPU; this one is on meta, where the CPU "
                                        "speed-ups do not apply"):
        tune(model)
    with pytest.raises(ValueError, match="seq=33 is longer than the context of 32"):
        tune(tiny_model, seq=33)
    with pytest.raises(ValueError, match="batch must be a positive integer, got 0"):
        tune(tiny_model, batch=0)
