"""The one timing helper: warm-up turns, then every call once a turn, in order."""

import pytest

from gpt2_decl.core.timing import Timing, time_in_turns


def test_calls_warm_up_then_take_turns_run_by_run():
    calls = []
    timings = time_in_turns({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                            runs=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert [len(timing.times_ms) for timing in timings.values()] == [3, 3]


@pytest.mark.parametrize("runs, warmup", [(0, 1), (3, -1)])
def test_impossible_counts_are_refused(runs, warmup):
    with pytest.raises(ValueError, match="need runs >= 1 and warmup >= 0"):
        time_in_turns({"f": lambda: None}, runs=runs, warmup=warmup)


def test_a_timing_reads_its_median_and_spread():
    timing = Timing((3.0, 1.0, 2.0))
    assert (timing.median_ms, timing.min_ms, timing.max_ms) == (2.0, 1.0, 3.0)
    assert timing.spread() == "2.0 [1.0-3.0]"
