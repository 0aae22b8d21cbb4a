"""The one way this project times things: several calls in turns, run by run, medians kept."""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpt2_decl.core.devices import synchronize


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of repeated runs, in milliseconds."""

    times_ms: tuple[float, ...]

    median_ms = property(lambda self: statistics.median(self.times_ms))
    min_ms = property(lambda self: min(self.times_ms))
    max_ms = property(lambda self: max(self.times_ms))

    def spread(self) -> str:
        return f"{self.median_ms:,.1f} [{self.min_ms:,.1f}-{self.max_ms:,.1f}]"


def time_in_turns(
    calls: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    *,
    runs: int,
    warmup: int = 1,
) -> dict[str, Timing]:
    """Time several calls in turns, run by run, after `warmup` untimed turns, so that a change
    in the machine's load (other processes, clocks) falls on all of them alike rather than on
    whichever ran last. The device's queued work is waited for after each call."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs} warmup={warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        for call in calls.values():
            call()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing(tuple(values)) for name, values in times.items()}
