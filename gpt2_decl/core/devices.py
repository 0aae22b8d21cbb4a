"""Where to run: the best device here, and a device name checked against this machine."""

import statistics
import time

import torch
from torch import Tensor

DEVICE_TYPES = ("cpu", "cuda", "mps", "meta")


def default_device() -> torch.device:
    """The fastest device here: cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`name` as a device that exists here (default: `default_device()`), or a ValueError that
    says what this machine has instead."""
    if name is None or name == "":
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"unknown device {str(name)!r}; expected one of {', '.join(DEVICE_TYPES)} "
            "(with an index for a GPU, e.g. cuda:1)"
        ) from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(
            f"unsupported device {str(name)!r}; expected one of {', '.join(DEVICE_TYPES)}"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(name)!r} asks for CUDA, but this machine has no CUDA GPU "
                "(or torch was built without CUDA)"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            names = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise ValueError(
                f"device {str(name)!r} does not exist: this machine has {count} CUDA "
                f"GPU{'s' if count != 1 else ''} ({names})"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(name)!r} asks for MPS, which this machine does not have")
    return device


def check_dtype_supported(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse bfloat16 on a CUDA GPU that cannot compute in it (before Ampere)."""
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"{name} ({device}) does not support bfloat16; use --dtype float32")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer around it measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# A matmul this size keeps every core busy with little edge waste: it measures the sustained peak.
ROOFLINE_MATMUL_SIZE = 2048
# Products a timed run of the roofline makes back to back, into one result: the sustained rate,
# not that of a first product after other work (measured up to twice as slow on a CPU), nor
# the page faults of a freshly allocated result.
ROOFLINE_PRODUCTS = 3


def roofline_products(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """One timed run of the roofline: `ROOFLINE_PRODUCTS` products a @ b into `out`."""
    for _ in range(ROOFLINE_PRODUCTS):
        torch.matmul(a, b, out=out)
    return out


def matmul_roofline(
    device: torch.device, dtype: torch.dtype, *, size: int = ROOFLINE_MATMUL_SIZE, runs: int = 5
) -> float:
    """FLOP/s of `size` x `size` matmuls in `dtype`, median of `runs` (after one warm-up) of
    `roofline_products`: the ceiling the model's matmuls face, for model FLOPs utilisation."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
    out = torch.empty_like(a)
    times = []
    with torch.no_grad():
        for run in range(runs + 1):
            start = time.perf_counter()
            roofline_products(a, b, out)
            synchronize(device)
            if run:
                times.append(time.perf_counter() - start)
    return 2 * size**3 * ROOFLINE_PRODUCTS / statistics.median(times)
