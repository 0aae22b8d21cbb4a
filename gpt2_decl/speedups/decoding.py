"""The decoding step on a CPU, compiled with a plan's speed-ups: a torch.compile backend that
rewrites the traced one-token step before inductor compiles it. The model's code and eager runs
are untouched.

- `gemm_template`: each product is inductor's C++ GEMM template for its shape (max-autotune
  with that one candidate, so nothing is timed while compiling).
- `gemv_kernel`: the products go to the C++ GEMV kernel (`gemv`), which streams each weight
  once, int8 rows as they are.
- `upcast_attention`: attention of one query per head over the cache, as two float32 products
  around a masked softmax, where the library's CPU attention is slow for one bfloat16 query.

With the template or the kernel, the weights become constants of the compiled step (inductor's
freezing): the template packs them once, and Dynamo checks each weight before a step by its
identity instead of its metadata (for torchao's int8 weights a Python call each: about a tenth
of an int8 step).

Always, inductor stores each pointwise result (LayerNorm's, say) once instead of recomputing it
inside every reduction that reads it, and leaves out its per-call size asserts.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from gpt2_decl.speedups import gemv
from gpt2_decl.speedups.rewrites import (
    GraphRewrite,
    attention_options,
    example_value,
    linear_arguments,
    on_cpu,
)

# Inductor's settings for every planned step: pointwise results stored, not recomputed per read.
STORE_POINTWISE = {"realize_acc_reads_threshold": 0, "size_asserts": False}
# Inductor's settings for the C++ GEMM template: max-autotune offered that one kernel, which it
# then takes without timing (quietly: no table of choices on stderr, amid generated text).
GEMM_TEMPLATE = {"max_autotune": True, "max_autotune_gemm_backends": "CPP",
                 "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


def upcast_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """`F.scaled_dot_product_attention` of one query per head over a boolean mask of visible
    keys, in float32 (or wider)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = q.to(dtype) @ keys.to(dtype).mT * (scale or 1 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~attn_mask, float("-inf"))
    return (scores.softmax(-1) @ values.to(dtype)).to(q.dtype)


@dataclass(frozen=True)
class DecodeStep(GraphRewrite):
    """The backend of a plan's decoding step; `freezes`: compiled with frozen weights (where
    the products are the template's or the kernel's; the library's int8 products would fold
    into float32 constants)."""

    gemv_kernel: bool = False
    gemm_template: bool = False
    upcast_attention: bool = False

    @property
    def freezes(self) -> bool:
        return self.gemm_template or self.gemv_kernel

    def options(self) -> dict[str, Any]:
        return STORE_POINTWISE | (GEMM_TEMPLATE if self.gemm_template else {})

    def replacement(self, node: fx.Node) -> Callable | None:
        if self.gemv_kernel and node.target is F.linear:
            x, weight = linear_arguments(node)
            if x is not None and weight is not None and on_cpu(x, weight) and gemv.reads(weight):
                return gemv.gemv_linear
        if self.upcast_attention and node.target is F.scaled_dot_product_attention \
                and _is_one_query_over_a_mask(node):
            return upcast_attention
        return None


def _is_one_query_over_a_mask(node: fx.Node) -> bool:
    q = example_value(node.args[0]) if node.args else None
    mask_node, dropout, causal = attention_options(node)
    mask = example_value(mask_node)
    return (q is not None and on_cpu(q) and q.shape[-2] == 1 and mask is not None
            and mask.dtype == torch.bool and dropout == 0.0 and not causal)
