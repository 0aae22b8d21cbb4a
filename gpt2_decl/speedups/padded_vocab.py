"""The output head's GEMM with its vocabulary padded to a multiple of 16 rows.

GPT-2's head has 50,257 rows, so each position's logits are 50,257 floats apart and only every
16th row of them starts on a 64-byte boundary; the CPU GEMM writing them is slower for it
(measured in docs/cpu-speedups.md). `PaddedVocab` pads the head's weight with zero rows (with
frozen weights: once, while compiling), multiplies, and slices the padding's logits off. The
logits are the same numbers, as a view into rows of the padded length: `logits.view(-1, vocab)`
works; `.contiguous()`, or flattening the vocab axis, copies them. Whether it pays is the
plan's to measure.
"""

import operator
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from gpt2_decl.speedups.rewrites import (
    GraphRewrite,
    example_value,
    linear_nodes,
    on_cpu,
    rows,
)
from gpt2_decl.speedups.upcast import upcast_linear

# Rows of the padded head: a multiple of this many (64 bytes of float32 logits).
PADDED_ROWS = 16


def padded_rows(weight: Tensor) -> Tensor:
    """`weight` with zero rows appended up to a multiple of PADDED_ROWS."""
    return F.pad(weight, (0, 0, 0, -weight.shape[0] % PADDED_ROWS))


def pads(x: Tensor | None, weight: Tensor | None, bias: object) -> bool:
    """Whether a product is a head to pad: a CPU GEMM (two or more rows) without bias, of a
    plain float weight whose rows are not a multiple of PADDED_ROWS."""
    return (x is not None and weight is not None and bias is None and on_cpu(x, weight)
            and weight.dim() == 2 and weight.dtype.is_floating_point
            and not is_traceable_wrapper_subclass(weight)
            and weight.shape[0] % PADDED_ROWS != 0 and rows(x) >= 2)


@dataclass(frozen=True)
class PaddedVocab(GraphRewrite):
    """A compile backend: `products` rewrites the graph's calls first (GEMMs upcast, say), then
    every product that `pads` takes is given the padded weight and its result sliced back."""

    products: GraphRewrite = field(default_factory=GraphRewrite)

    def rewrite(self, graph_module: fx.GraphModule) -> dict[str, int]:
        counts = self.products.rewrite(graph_module)
        padded = 0
        for node in list(graph_module.graph.nodes):
            if node.op == "call_function" and node.target in (F.linear, upcast_linear):
                x, weight, bias = linear_nodes(node)
                if pads(example_value(x), example_value(weight), bias):
                    _pad(graph_module.graph, node, weight)
                    padded += 1
        if padded:  # the products' rewrite has recompiled the graph it left
            counts["padded_vocab"] = padded
            graph_module.recompile()
        return counts

    def options(self) -> dict[str, Any]:
        return self.products.options()


def _pad(graph: fx.Graph, product: fx.Node, weight: fx.Node) -> None:
    """Give `product` the padded `weight`, and its users the padding's outputs sliced off."""
    vocab = example_value(weight).shape[0]
    with graph.inserting_before(product):
        padded_weight = graph.call_function(padded_rows, (weight,))
    padded_weight.meta["example_value"] = padded_rows(example_value(weight))
    if len(product.args) > 1:
        product.update_arg(1, padded_weight)
    else:
        product.update_kwarg("weight", padded_weight)
    with graph.inserting_after(product):
        logits = graph.call_function(operator.getitem, (product, (Ellipsis, slice(None, vocab))))
    product.replace_all_uses_with(logits, delete_user_cb=lambda user: user is not logits)
    logits.meta["example_value"] = product.meta.get("example_value")
    x = example_value(linear_nodes(product)[0])
    product.meta["example_value"] = product.target(x, padded_weight.meta["example_value"])

