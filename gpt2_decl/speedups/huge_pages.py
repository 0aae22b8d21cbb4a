"""Weights in transparent huge pages, for decoding on a CPU, which streams them from memory.

Decoding one token reads every weight once. In the usual 4 KiB pages that stream crosses a page
boundary every 64 cache lines, each time with a TLB miss and a hardware prefetcher that stops at
the boundary; in 2 MiB pages it runs on. Linux backs anonymous memory with huge pages where it
is marked with madvise(MADV_HUGEPAGE) and /sys/kernel/mm/transparent_hugepage/enabled is
"always" or "madvise"; torch's allocator marks none unless THP_MEM_ALLOC_ENABLE=1 is set before
it starts. Nothing here runs unless asked: `gpt2-decl generate --huge-pages`, `gpt2-decl bench
--generate --huge-pages`, or `move_parameters(model)`.
"""

import mmap
import weakref
from pathlib import Path

import torch
from torch import Tensor, nn

from gpt2_decl.core.counting import inner_tensor_names

HUGE_PAGE_BYTES = 2 * 2**20
# Where each moved tensor starts: a cache line, as torch's own allocator aligns tensors.
TENSOR_ALIGNMENT_BYTES = 64
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# The address range each module's parameters were moved into; a module counts as moved while
# every parameter still lies in it (a later `.to(dtype)` puts them elsewhere).
_moved: "weakref.WeakKeyDictionary[nn.Module, range]" = weakref.WeakKeyDictionary()


def available() -> bool:
    """Whether this system gives huge pages to memory that asks for them (Linux, THP on)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def empty(n_bytes: int) -> Tensor:
    """A uint8 CPU tensor of `n_bytes` that starts on a huge page, in memory marked for them."""
    if not available():
        raise RuntimeError(
            "this system gives no transparent huge pages (needs Linux with "
            f"{THP_SETTING} set to 'always' or 'madvise')"
        )
    region, start = _region(n_bytes)
    return torch.frombuffer(region, dtype=torch.uint8, count=n_bytes, offset=start)


def move_parameters(module: nn.Module) -> bool:
    """Copy `module`'s CPU parameters into one region of huge pages, unless they are there
    already or the system gives none; return whether they moved.

    The Parameter objects stay (only their `.data` moves; a quantized weight's inner tensors,
    torchao's int8 rows and their scales, are set on it anew), so tied weights, optimizers and
    compiled graphs that take them as inputs are unaffected; each keeps a storage of its own,
    so saving them is unaffected too. What changes: every moved tensor is contiguous, distinct
    parameters that shared one storage no longer do, and the new storages cannot be resized.
    Empty parameters, and a quantized weight's inner tensors that are not plain contiguous
    tensors, stay where they are.
    """
    parameters = [parameter for parameter in module.parameters() if parameter.numel() > 0]
    if (
        not parameters
        or not available()
        or any(parameter.device.type != "cpu" for parameter in parameters)
    ):
        return False
    stored = _stored(parameters)
    if _still_moved(module, stored):
        return False
    sizes = [_aligned(tensor.numel() * tensor.element_size()) for _, _, tensor in stored]
    region, start = _region(sum(sizes))
    offset = start
    with torch.no_grad():
        for (owner, name, tensor), size in zip(stored, sizes, strict=True):
            moved = torch.frombuffer(
                region, dtype=tensor.dtype, count=tensor.numel(), offset=offset
            ).view(tensor.shape)
            moved.copy_(tensor)
            if name is None:
                owner.data = moved
            else:
                setattr(owner, name, moved)
            offset += size
    first = torch.frombuffer(region, dtype=torch.uint8, count=1, offset=start).data_ptr()
    _moved[module] = range(first, first + offset - start)
    return True


def _stored(parameters: list[nn.Parameter]) -> list[tuple[nn.Parameter, str | None, Tensor]]:
    """What to move: (parameter, None, its data) for a plain one; (parameter, attribute, inner
    tensor) for each inner tensor of a quantized one that is plain, contiguous and not empty."""
    stored = []
    for parameter in parameters:
        names = inner_tensor_names(parameter)
        if not names:
            stored.append((parameter, None, parameter.data))
        for name in names:
            inner = getattr(parameter, name)
            if not inner_tensor_names(inner) and inner.is_contiguous() and inner.numel() > 0:
                stored.append((parameter, name, inner))
    return stored


def _region(n_bytes: int) -> tuple[mmap.mmap, int]:
    """Anonymous private memory marked for huge pages, and the offset of its first huge page."""
    region = mmap.mmap(
        -1, n_bytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    )
    region.madvise(mmap.MADV_HUGEPAGE)
    address = torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr()
    return region, -address % HUGE_PAGE_BYTES


def _aligned(n_bytes: int) -> int:
    return -(-n_bytes // TENSOR_ALIGNMENT_BYTES) * TENSOR_ALIGNMENT_BYTES


def _still_moved(module: nn.Module, stored: list[tuple[nn.Parameter, str | None, Tensor]]
                 ) -> bool:
    addresses = _moved.get(module)
    return addresses is not None and all(
        tensor.data_ptr() in addresses for _, _, tensor in stored
    )
