"""Graph rewrites: torch.compile backends that change some calls of the traced graph, then hand
it to inductor; and their eager counterpart for a model's products (`LinearMode`). What to
rewrite is decided before (by a plan), never timed inside a backend or a mode."""

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class GraphRewrite:
    """A torch.compile backend: each call of the traced graph that `replacement` gives a
    replacement for calls it instead; then inductor compiles the graph with `options()`. Equal
    rewrites are one backend to Dynamo, which then reuses their graphs."""

    def __call__(self, graph_module: fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        self.rewrite(graph_module)
        return compile_fx(graph_module, example_inputs, config_patches=self.options())

    def rewrite(self, graph_module: fx.GraphModule) -> dict[str, int]:
        """Rewrite `graph_module` in place; how many calls each replacement took."""
        counts: dict[str, int] = {}
        for node in graph_module.graph.nodes:
            target = self.replacement(node) if node.op == "call_function" else None
            if target is not None:
                node.target = target
                name = getattr(target, "__name__", str(target))
                counts[name] = counts.get(name, 0) + 1
        graph_module.recompile()
        return counts

    def replacement(self, node: fx.Node) -> Callable | None:
        """What the node is to call instead; None to leave it as it is."""
        return None

    def options(self) -> dict[str, Any]:
        """Inductor settings for the rewritten graph."""
        return {}


class LinearMode(TorchFunctionMode):
    """Within it, each eager CPU product (`F.linear`, no gradient recorded) that `replacement`
    gives a replacement for calls it instead, with the same arguments."""

    def replacement(self, x: Tensor, weight: Tensor) -> Callable | None:
        """What the product of `x` and `weight` is to call instead; None to leave it."""
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_call(*args, **kwargs)
            if isinstance(x, Tensor) and isinstance(weight, Tensor) and on_cpu(x, weight) \
                    and not recording_gradient(x, weight):
                product = self.replacement(x, weight)
                if product is not None:
                    return product(x, weight, bias)
        return func(*args, **kwargs)


def _linear_call(input: object = None, weight: object = None, bias: object = None
                 ) -> tuple[object, object, object]:
    """`F.linear`'s arguments, however they were passed."""
    return input, weight, bias


def example_value(node: object) -> Tensor | None:
    """The tensor a traced graph's node stood for while tracing; None for anything else."""
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, Tensor) else None


def linear_nodes(node: fx.Node) -> tuple[Any, Any, Any]:
    """The input, weight and bias of a traced `F.linear` (or a call taking its arguments),
    however they were passed."""
    args, kwargs = node.args, node.kwargs
    return (args[0] if args else kwargs.get("input"),
            args[1] if len(args) > 1 else kwargs.get("weight"),
            args[2] if len(args) > 2 else kwargs.get("bias"))


def linear_arguments(node: fx.Node) -> tuple[Tensor | None, Tensor | None]:
    """The example input and weight of a traced `F.linear`, however they were passed."""
    x, weight, _ = linear_nodes(node)
    return example_value(x), example_value(weight)


def attention_options(node: fx.Node) -> tuple[object, object, object]:
    """The `attn_mask`, `dropout_p` and `is_causal` of a traced
    `F.scaled_dot_product_attention`, however they were passed."""
    args, kwargs = node.args, node.kwargs
    return (kwargs.get("attn_mask", args[3] if len(args) > 3 else None),
            kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0),
            kwargs.get("is_causal", args[5] if len(args) > 5 else False))


def rows(x: Tensor) -> int:
    """The rows of a product's input: every axis but the last, multiplied (a dynamic size
    counts as its hint, or as many)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return math.prod(optimization_hint(size, fallback=1024) for size in x.shape[:-1])


def on_cpu(*tensors: Tensor | None) -> bool:
    return all(tensor is not None and tensor.device.type == "cpu" for tensor in tensors)


def recording_gradient(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)
