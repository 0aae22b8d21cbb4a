"""Products of many rows made a block of rows at a time, in compiled CPU graphs.

The library's matrix product chooses how to split a product among the cores and caches by its
own rules, and for some shapes its product of all the rows at once runs slower than the same
product made in blocks of a few hundred rows, one after another (each block's rows and
results stay in cache while the weight streams past). Which shapes, and which block size,
depends on the machine and the dtype: bfloat16 products on CPUs with matrix tiles (AMX) are
where it was seen.

`RowBlocks` is a torch.compile backend that makes the rewrite in the traced graph, for the
`F.linear` products on the CPU with no gradient recorded, at each shape where timing on this
machine finds a block size faster than the product as inductor makes it (with frozen weights,
the library's product with the weight laid out once for it, as the blocks then take it too);
then it hands the graph on (to inductor, or to another backend). The blocks are one call the
graph makes (`gpt2_decl::row_blocks_linear`), so the weight is laid out once, not once per
block. The model's code and eager runs are untouched; use it as

    gpt2_decl.compile(model, freeze=True, backend=RowBlocks())
    gpt2_decl.compile(model, freeze=True, backend=WideProducts(then=RowBlocks()))
"""

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.weak import WeakIdKeyDictionary

from gpt2_decl.speedups.wide_products import (
    RewriteThen,
    describe_timings,
    example_value,
    linear_weight,
    medians_in_turns,
)

# The block sizes timed against the whole product: a product takes the fastest of those that
# beat it, among the ones that make at least two blocks.
BLOCK_ROWS = (128, 256, 512)
# A product's timing uses at most this many of its weight's rows (the output head's 50257
# would take seconds): time grows with them evenly.
TIMED_ROWS = 4096
RUNS = 5
# The dtypes inductor's frozen graphs multiply with weights laid out for the library's product.
PACKED_DTYPES = (torch.float32, torch.bfloat16)


@torch.library.custom_op("gpt2_decl::row_blocks_linear", mutates_args=())
def row_blocks_linear(x: Tensor, weight: Tensor, bias: Tensor | None, block: int,
                      packed: bool = False) -> Tensor:
    """`F.linear(x, weight, bias)`, `block` rows of x at a time, into one result; `packed`:
    through the library's product with the weight laid out for it (`packs`), as inductor's
    frozen graphs multiply."""
    rows = x.reshape(-1, x.shape[-1])
    out = rows.new_empty(rows.shape[0], weight.shape[0])
    laid_out = _laid_out(weight, block) if packed else None
    for start in range(0, rows.shape[0], block):
        part = slice(start, start + block)
        if laid_out is not None:
            out[part] = torch.ops.mkldnn._linear_pointwise(rows[part], laid_out, bias, "none",
                                                           [], "")
        elif bias is None:
            torch.mm(rows[part], weight.t(), out=out[part])
        else:
            torch.addmm(bias, rows[part], weight.t(), out=out[part])
    return out.view(*x.shape[:-1], weight.shape[0])


@row_blocks_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, block: int, packed: bool = False
      ) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def packs(dtype: torch.dtype) -> bool:
    """Whether the library lays weights of `dtype` out for its product, as inductor's frozen
    graphs do."""
    return dtype in PACKED_DTYPES and torch.backends.mkldnn.is_available()


# Each weight laid out for the library's product, with the weight's version when it was: a
# frozen graph passes its weights, constants, to every call.
_layouts: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _laid_out(weight: Tensor, block: int) -> Tensor:
    found = _layouts.get(weight)
    if found is None or found[0] != weight._version:
        found = _layouts[weight] = (weight._version,
                                    torch.ops.mkldnn._reorder_linear_weight(weight, block))
    return found[1]


@dataclass(frozen=True)
class RowBlocks(RewriteThen):
    """The backend (`RewriteThen`: then `then`, or inductor in `mode`): the products that time
    faster in blocks of rows made so."""

    def replacement(self, node: fx.Node) -> Callable | None:
        if node.op != "call_function" or node.target is not F.linear:
            return None
        shape = _cpu_product(node)
        if shape is None:
            return None
        frozen = bool(torch._inductor.config.freezing)
        block = fastest_block(*shape, frozen=frozen)
        if block is None:
            return None
        # The op takes (x, weight, bias, block) in order, however F.linear was called.
        args, kwargs = node.args, node.kwargs
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        packed = frozen and packs(shape[3])
        node.args, node.kwargs = (args[0], weight, bias, block, packed), {}
        return torch.ops.gpt2_decl.row_blocks_linear.default


# (rows, in_features, out_features timed, block, dtype, frozen, threads) -> (the blocks' ms,
# the whole product's ms), medians.
_times: dict[tuple, tuple[float, float]] = {}


def fastest_block(rows: int, in_features: int, out_features: int, dtype: torch.dtype,
                  frozen: bool) -> int | None:
    """The block size whose blocks time fastest for a product of `rows` rows with a weight of
    this shape and dtype on this machine, if they beat the whole product (frozen: as inductor's
    frozen graphs make it); None where none does. Timed once per shape in a process."""
    found = {block: time_blocks(rows, in_features, out_features, block, dtype, frozen)
             for block in BLOCK_ROWS if 2 * block <= rows}
    winners = {block: blocks for block, (blocks, whole) in found.items() if blocks < whole}
    return min(winners, key=winners.__getitem__) if winners else None


def time_blocks(rows: int, in_features: int, out_features: int, block: int, dtype: torch.dtype,
                frozen: bool) -> tuple[float, float]:
    """Median milliseconds of the product in blocks of `block` rows and of the whole product,
    both as inductor makes them (frozen: with the weight laid out for the library's product),
    runs taken in turns, on random operands (at most TIMED_ROWS weight rows, and the product's
    bias)."""
    out_features = min(out_features, TIMED_ROWS)
    key = (rows, in_features, out_features, block, dtype, frozen, torch.get_num_threads())
    if key not in _times:
        generator = torch.Generator().manual_seed(0)
        x, weight = (torch.randn(size, generator=generator).to(dtype)
                     for size in ((rows, in_features), (out_features, in_features)))
        bias = torch.zeros(out_features, dtype=dtype)
        packed = frozen and packs(dtype)
        _times[key] = medians_in_turns([lambda: row_blocks_linear(x, weight, bias, block, packed),
                                        _whole_product(x, weight, bias, packed)], RUNS)
    return _times[key]


def _whole_product(x: Tensor, weight: Tensor, bias: Tensor, packed: bool) -> Callable:
    """The product as inductor makes it: in a frozen graph, with the weight laid out once for
    the library's product (where the library has one for the dtype); else as `F.linear`."""
    if packed:
        laid_out = torch.ops.mkldnn._reorder_linear_weight(weight, x.shape[0])
        return lambda: torch.ops.mkldnn._linear_pointwise(x, laid_out, bias, "none", [], "")
    return lambda: F.linear(x, weight, bias)


def timings() -> dict[tuple, tuple[float, float]]:
    """What this process has timed: (rows, in_features, out_features timed, block, dtype,
    frozen, threads) -> (the blocks' ms, the whole product's ms)."""
    return dict(_times)


def describe(times: dict[tuple, tuple[float, float]] | None = None) -> str:
    """`times` (by default all of this process's timings) in words, a line per product shape
    and block size."""
    times = _times if times is None else times
    return describe_timings({(*key[:4], key[4], key[6]): ms for key, ms in times.items()},
                            "blocks", "in blocks", "no products of many rows timed", "whole",
                            "whole")


def _cpu_product(linear: fx.Node) -> tuple[int, int, int, torch.dtype] | None:
    """(rows, in_features, out_features, dtype) of a product on the CPU with no gradient
    recorded, of a plain float weight (a quantized one has products of its own); None for any
    other."""
    x, weight = example_value(linear.args[0]), linear_weight(linear)
    if x is None or weight is None or weight.dim() != 2 or x.dim() < 2:
        return None
    if not x.dtype.is_floating_point or x.dtype != weight.dtype \
            or is_traceable_wrapper_subclass(weight):
        return None
    if x.device.type != "cpu" or weight.device.type != "cpu" or (
            torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = math.prod(optimization_hint(size, fallback=1024) for size in x.shape[:-1])
    out_features, in_features = (int(size) for size in weight.shape)
    return rows, in_features, out_features, x.dtype
