"""Timing, and the machine's limits measured in the same process: memory read bandwidth and
where the run happens."""

import datetime
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from gpt2_decl.core.devices import synchronize
from gpt2_decl.speedups import huge_pages

# Large enough to spill the last-level cache of any current CPU, so the read runs from memory.
READ_BANDWIDTH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of repeated runs, in milliseconds."""

    times_ms: tuple[float, ...]

    median_ms = property(lambda self: statistics.median(self.times_ms))
    min_ms = property(lambda self: min(self.times_ms))
    max_ms = property(lambda self: max(self.times_ms))

    def spread(self) -> str:
        return f"{self.median_ms:,.1f} [{self.min_ms:,.1f}-{self.max_ms:,.1f}]"


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, *, runs: int, warmup: int
) -> dict[str, Timing]:
    """Time several functions in turn, run by run, so a change in the machine's load (other
    processes, clocks) falls on all of them alike rather than on whichever ran last."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs} warmup={warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing(tuple(values)) for name, values in times.items()}


class ReadBandwidth:
    """Bytes/s of reading a buffer larger than the caches (a sum over it): the ceiling of a
    step that streams its weights once, as batch-1 decoding does. In huge pages when the
    weights are there."""

    def __init__(self, device: torch.device, *, in_huge_pages: bool = False,
                 n_bytes: int = READ_BANDWIDTH_BYTES):
        self.device = device
        if in_huge_pages:
            buffer = huge_pages.empty(n_bytes).view(torch.float32)
        else:
            buffer = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
        self.buffer: Tensor = buffer.fill_(1.0)

    def __call__(self) -> Tensor:
        return self.buffer.sum()

    def bytes_per_s(self, timing: Timing) -> float:
        return self.buffer.numel() * self.buffer.element_size() / (timing.median_ms / 1e3)


def device_name(device: torch.device) -> str:
    """What the device is, in words: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Where and when a benchmark ran: enough to compare figures across machines and days."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu": device_name(torch.device("cpu")),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def random_tokens(vocab_size: int, batch: int, seq: int, device: torch.device, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (batch, seq), generator=generator).to(device)


def transformers_copy(model: nn.Module) -> nn.Module | None:
    """transformers' `GPT2LMHeadModel` (SDPA attention) with `model`'s weights, on its device,
    in its dtype, for inference; None, said, if transformers is not installed."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        print("transformers is not installed: no reference row")
        return None
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        reference = GPT2LMHeadModel.from_pretrained(directory, dtype=model.dtype,
                                                    attn_implementation="sdpa")
    return reference.to(model.device).eval()
