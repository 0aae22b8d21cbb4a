"""Causal self-attention of whole sequences through a C++ kernel, on a CPU.

`scaled_dot_product_attention`'s CPU kernel works in large blocks of queries and keys and
computes the masked part of the blocks on the causal diagonal before it drops it. The kernel
(kernels/causal_attention.cpp, built with the decoding kernels by `row_kernels.load`) passes
over the keys six query rows at a time, with the online softmax in registers, and stops at each
row's own position: it computes only the scores a causal mask shows. It sums in float32
(bfloat16 queries, keys and values widened as they are read, the output rounded back) and has
no gradient. Where the CPU multiplies bfloat16 in matrix tiles (AMX), bfloat16 attention goes
through them instead (kernels/causal_attention_tiles.cpp): 32 queries at a time over blocks of
64 keys up to the last one's position, the weights rounded to bfloat16 for the values' product
as the library's attention rounds them.

`KernelAttention` is a torch.compile backend that makes the rewrite in the traced graph, for
causal attention with no mask, no dropout and no gradient recorded, float32 or bfloat16, d_head
a multiple of 16 up to 128, at each shape where timing on this machine finds the kernel faster
than the library's; then it hands the graph on (to inductor, or to another backend). The
model's code, eager runs and training are untouched; use it as

    gpt2_decl.compile(model, freeze=True, backend=KernelAttention())
    gpt2_decl.compile(model, freeze=True, backend=KernelAttention(then=WideProducts()))

The kernel also takes queries that follow earlier keys: a prompt run over a cache, whose mask
shows each query the cache's first keys and its own prompt up to itself. Within
`EagerKernelAttention`, eager attention of either kind (no gradient, no dropout) goes through
the kernel; generation uses it for a prompt where `cpu_decoding.choice_for` timed the kernel
faster.
"""

import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.overrides import TorchFunctionMode

from gpt2_decl.speedups import row_kernels
from gpt2_decl.speedups.wide_products import (
    RewriteThen,
    attention_options,
    describe_timings,
    example_value,
    medians_in_turns,
)

DTYPES = (torch.float32, torch.bfloat16)
RUNS = 5


def kernel_causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """`F.scaled_dot_product_attention` of causal self-attention through the kernel."""
    if attn_mask is not None or dropout_p != 0.0 or not is_causal or enable_gqa:
        raise ValueError("kernel causal attention takes is_causal=True, and no mask, dropout "
                         "or grouped queries")
    return torch.ops.gpt2_decl.causal_attention(
        q, k, v, 1 / math.sqrt(q.shape[-1]) if scale is None else scale)


# (batch, heads, seq, d_head, dtype, threads) -> (kernel's ms, library's ms), medians.
_times: dict[tuple, tuple[float, float]] = {}


@dataclass(frozen=True)
class KernelAttention(RewriteThen):
    """The backend (`RewriteThen`: then `then`, or inductor in `mode`): causal attention
    through the kernel where that times faster."""

    def replacement(self, node: fx.Node) -> Callable | None:
        """The kernel, for causal attention that times faster through it (none where the
        kernel cannot be built)."""
        if row_kernels.load() is not None:
            return None
        shape = _causal_self_attention(node)
        return kernel_causal_attention if shape is not None and kernel_wins(*shape) else None


def kernel_wins(batch: int, heads: int, seq: int, d_head: int, dtype: torch.dtype) -> bool:
    """Whether the kernel beats the library's causal attention of this shape and dtype on this
    machine (timed once per shape and thread count in a process)."""
    kernel_ms, library_ms = time_attention(batch, heads, seq, d_head, dtype)
    return kernel_ms < library_ms


def time_attention(batch: int, heads: int, seq: int, d_head: int, dtype: torch.dtype
                   ) -> tuple[float, float]:
    """Median milliseconds of the kernel's causal attention and the library's, runs taken in
    turns, on random queries, keys and values."""
    key = (batch, heads, seq, d_head, dtype, torch.get_num_threads())
    if key not in _times:
        why_not = row_kernels.load()
        if why_not is not None:
            raise RuntimeError(why_not)
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(batch, heads, seq, d_head, generator=generator).to(dtype)
                   for _ in range(3))
        _times[key] = medians_in_turns(
            [lambda: kernel_causal_attention(q, k, v, is_causal=True),
             lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)], RUNS)
    return _times[key]


def timings() -> dict[tuple, tuple[float, float]]:
    """What this process has timed: (batch, heads, seq, d_head, dtype, threads) -> (kernel's
    ms, library's ms)."""
    return dict(_times)


def describe(times: dict[tuple, tuple[float, float]] | None = None) -> str:
    """`times` (by default all of this process's timings) in words, a line per shape."""
    return describe_timings(_times if times is None else times, "kernel", "the kernel's",
                            "no causal attention timed")


def _causal_self_attention(node: fx.Node) -> tuple[int, int, int, int, torch.dtype] | None:
    """(batch, heads, seq, d_head, dtype) of a traced causal self-attention the kernel does:
    no mask, dropout or grouped queries, on the CPU, with no gradient recorded through it;
    None for anything else."""
    if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
        return None
    q, k, v = (example_value(arg) for arg in node.args[:3])
    mask, dropout, causal = attention_options(node)
    if q is None or k is None or v is None or mask is not None or dropout != 0.0 \
            or causal is not True or node.kwargs.get("enable_gqa", False):
        return None
    tensors = (q, k, v)
    if q.dim() != 4 or q.dtype not in DTYPES or any(
            t.dtype != q.dtype or t.device.type != "cpu" or t.requires_grad or t.dim() != 4
            for t in tensors):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shapes = [tuple(optimization_hint(size, fallback=1024) for size in t.shape)
                  for t in tensors]
    if shapes[1] != shapes[0] or shapes[2] != shapes[0]:
        return None
    batch, heads, seq, d_head = shapes[0]
    if not takes_head_size(d_head):
        return None
    return batch, heads, seq, d_head, q.dtype


def causal_offset(mask: Tensor, seq: int, keys: int) -> int | None:
    """The number of earlier keys after which `mask` ([batch or 1, 1, seq, keys] booleans) is
    causal attention's: query i sees keys 0 .. offset + i and no others, in every row; None
    where it is not (a row's padding hidden, say)."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 \
            or tuple(mask.shape[2:]) != (seq, keys) or seq == 0:
        return None
    offset = int(mask[0, 0, 0].sum()) - 1
    if offset < 0 or offset + seq > keys:
        return None
    positions = torch.arange(keys, device=mask.device)
    causal = positions <= offset + torch.arange(seq, device=mask.device)[:, None]
    return offset if bool((mask == causal).all()) else None


class EagerKernelAttention(TorchFunctionMode):
    """Within it, eager `F.scaled_dot_product_attention` on the CPU goes through the kernel
    where it is causal attention the kernel does: is_causal over the queries' own keys, or a
    mask `causal_offset` finds causal after earlier keys; no dropout or grouped queries, no
    gradient recorded, float32 or bfloat16, d_head a multiple of 16 up to 128. Other attention
    stays as it is, and all of it where the kernel cannot be built. A mask is checked once
    while it is unchanged (a model passes the same one to every layer)."""

    def __init__(self):
        super().__init__()
        self.loaded = row_kernels.load() is None
        self._checked: tuple[weakref.ref, int, int | None] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.loaded:
            q, k, v, mask, dropout, causal, scale, gqa = _attention_arguments(*args, **kwargs)
            offset = self._offset(q, k, v, mask, causal) \
                if dropout == 0.0 and not gqa and _kernel_takes(q, k, v) else None
            if offset is not None:
                return torch.ops.gpt2_decl.causal_attention(
                    q, k, v, 1 / math.sqrt(q.shape[-1]) if scale is None else scale, offset)
        return func(*args, **kwargs)

    def _offset(self, q: Tensor, k: Tensor, v: Tensor, mask: object, causal: bool
                ) -> int | None:
        seq, keys = q.shape[2], k.shape[2]
        if mask is None:
            return 0 if causal and keys == seq else None
        if causal or not isinstance(mask, Tensor) or mask.device.type != "cpu":
            return None
        if self._checked is None or self._checked[0]() is not mask \
                or self._checked[1] != mask._version:
            self._checked = (weakref.ref(mask), mask._version, causal_offset(mask, seq, keys))
        return self._checked[2]


def takes_head_size(d_head: int) -> bool:
    """Whether the kernel takes heads of d_head: a multiple of 16 (a vector) up to 128."""
    return d_head % 16 == 0 and 0 < d_head <= 128


def _attention_arguments(query: object = None, key: object = None, value: object = None,
                         attn_mask: object = None, dropout_p: float = 0.0,
                         is_causal: bool = False, scale: float | None = None,
                         enable_gqa: bool = False) -> tuple:
    """`F.scaled_dot_product_attention`'s arguments, however they were passed."""
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def _kernel_takes(q: object, k: object, v: object) -> bool:
    """Whether the kernel does attention of these queries, keys and values, eagerly."""
    tensors = (q, k, v)
    if not all(isinstance(t, Tensor) and t.dim() == 4 and t.device.type == "cpu"
               for t in tensors):
        return False
    return (q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and k.shape == v.shape and k.shape[:2] == q.shape[:2] and k.shape[3] == q.shape[3]
            and takes_head_size(q.shape[3])
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))
