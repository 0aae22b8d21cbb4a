"""bfloat16 matrix products upcast to float32, for CPUs without bfloat16 arithmetic.

A CPU without AVX512-BF16 or AMX has its BLAS emulate bfloat16 GEMMs at a fraction of the
float32 rate. Upcasting both operands to float32 (exact), multiplying in float32 and rounding
the result to bfloat16 once gives what the library's bfloat16 GEMM gives, which also sums in
float32, up to the order of the sums. Weight-only int8 weights (`quantize`) are dequantized to
float32 the same way: torchao's own product of many rows dequantizes them to bfloat16 first.

`UpcastProducts` rewrites the compiled graph's products of two or more rows (GEMMs; one row is
a GEMV, decoding's) and the batched products of two activations: queries by keys and patterns
by values, in the layers whose patterns are captured or patched. `UpcastLinear` does it for
eager products within it (a prompt before decoding). Whether either pays is the plan's to
measure (`tune`): where the CPU has bfloat16 arithmetic, the library's product wins.
"""

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from gpt2_decl.speedups.quantize import int8_rows
from gpt2_decl.speedups.rewrites import (
    GraphRewrite,
    LinearMode,
    example_value,
    linear_arguments,
    on_cpu,
    rows,
)

# The float dtypes whose products are upcast.
NARROW_DTYPES = (torch.bfloat16, torch.float16)


def upcast_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` in float32 (an int8 weight dequantized to it), the result in `x`'s dtype."""
    wide_bias = None if bias is None else bias.float()
    return F.linear(x.float(), upcast_weight(weight), wide_bias).to(x.dtype)


def upcast_weight(weight: Tensor) -> Tensor:
    """`weight` in float32: a weight-only int8 weight's rows as (qdata - zero_point) * scale."""
    int8 = int8_rows(weight)
    if int8 is None:
        return weight.float()
    qdata, scale, zero_point = int8
    return (qdata.float() - zero_point.float()) * scale.float()


def upcast_matmul(a: Tensor, b: Tensor) -> Tensor:
    """`a @ b` in float32, the result in `a`'s dtype."""
    return torch.matmul(a.float(), b.float()).to(a.dtype)


def upcasts(x: Tensor, weight: Tensor) -> bool:
    """Whether a product of `x` and `weight` is one to upcast: a bfloat16 (or float16) weight
    and input, or a weight-only int8 weight."""
    if weight.dim() != 2 or x.dim() < 2 or not x.dtype.is_floating_point:
        return False
    if is_traceable_wrapper_subclass(weight):
        return int8_rows(weight) is not None
    return weight.dtype in NARROW_DTYPES and x.dtype == weight.dtype


@dataclass(frozen=True)
class UpcastProducts(GraphRewrite):
    """A compile backend: the CPU GEMMs (two or more rows) that `upcasts` takes, and the
    CPU products of two bfloat16 (or float16) activations, upcast."""

    def replacement(self, node: fx.Node) -> Callable | None:
        if node.target in (operator.matmul, torch.matmul):
            a, b = (example_value(arg) for arg in node.args[:2])
            if a is None or b is None or not on_cpu(a, b) or a.dtype not in NARROW_DTYPES \
                    or b.dtype != a.dtype:
                return None
            return upcast_matmul if rows(a) >= 2 else None
        if node.target is not F.linear:
            return None
        x, weight = linear_arguments(node)
        if x is None or weight is None or not on_cpu(x, weight) or not upcasts(x, weight):
            return None
        return upcast_linear if rows(x) >= 2 else None


def forward_backend(upcast: bool) -> Callable | str:
    """The compile backend of a plan's forward passes."""
    return UpcastProducts() if upcast else GraphRewrite()


class UpcastLinear(LinearMode):
    """Within it, eager CPU GEMMs (two or more rows, no gradient recorded) that `upcasts`
    takes go through `upcast_linear`."""

    def replacement(self, x: Tensor, weight: Tensor) -> Callable | None:
        return upcast_linear if upcasts(x, weight) and rows(x) >= 2 else None
