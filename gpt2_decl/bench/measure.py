"""The machine's limits measured in the same process (memory read bandwidth), where the run
happens, and random tokens to run on."""

import datetime
import platform

import torch
from torch import Tensor

from gpt2_decl.core.timing import Timing
from gpt2_decl.speedups.machine import cpu_features, cpu_model

# Large enough to spill the last-level cache of any current CPU, so the read runs from memory.
READ_BANDWIDTH_BYTES = 256 * 2**20


class ReadBandwidth:
    """Bytes/s of reading a buffer larger than the caches (a sum over it): the ceiling of a
    step that streams its weights once, as batch-1 decoding does."""

    def __init__(self, device: torch.device, *, n_bytes: int = READ_BANDWIDTH_BYTES):
        self.device = device
        self.buffer: Tensor = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)

    def __call__(self) -> Tensor:
        return self.buffer.sum()

    def bytes_per_s(self, timing: Timing) -> float:
        return self.buffer.numel() * self.buffer.element_size() / (timing.median_ms / 1e3)


def device_name(device: torch.device) -> str:
    """What the device is, in words: the GPU's name, or the CPU's model name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Where and when a benchmark ran: enough to compare figures across machines and days."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def random_tokens(vocab_size: int, batch: int, seq: int, device: torch.device, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (batch, seq), generator=generator).to(device)
