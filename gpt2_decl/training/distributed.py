"""The processes of a training run (one, or torchrun's) and the signals that ask them to stop."""

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2_decl.core.devices import resolve_device

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class ProcessGroup:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum(self, values: list[float]) -> list[float]:
        """Sum `values` over every process (one all-reduce)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over every process, in place, without waiting for the device."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


@contextlib.contextmanager
def process_group(device_name: str | None) -> Iterator[ProcessGroup]:
    """One process, or torchrun's: it sets WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous.

    On CUDA each process takes the GPU of its local rank: NCCL refuses two processes on one
    GPU ("invalid usage", seen on an H200), so a device that names one GPU is refused."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield ProcessGroup(0, 1, device)
        return
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"under torchrun each process takes the GPU of its local rank: "
                             f"give --device cuda, not {device}")
        device = gpu_of_local_rank()
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield ProcessGroup(dist.get_rank(), dist.get_world_size(), device)
    finally:
        if created:
            dist.destroy_process_group()


def gpu_of_local_rank() -> torch.device:
    local_rank, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"{os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes per node, but this "
            f"machine has {count} CUDA GPU{'s' if count != 1 else ''}: NCCL needs one GPU per "
            f"process (--nproc_per_node={count})"
        )
    return torch.device("cuda", local_rank)


class StopSignals:
    """Turn Ctrl-C (SIGINT) and SIGTERM into a request to stop after the current step, which then
    saves a checkpoint. Repeats are ignored, so the save completes: torchrun forwards the signal
    to its workers, which thus get it twice. (Ctrl-\\, SIGQUIT, still aborts at once.)"""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: object) -> None:
        self.requested = True

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
