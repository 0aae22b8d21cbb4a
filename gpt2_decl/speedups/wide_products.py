"""bfloat16 products done in float32, on CPUs that multiply float32 faster.

A CPU without bfloat16 arithmetic (no AVX512-BF16, no AMX) has its libraries emulate bfloat16
matrix products, at a fraction of their float32 rate: a compiled bfloat16 forward there runs
several times slower than the same model in float32. Widening both operands to float32 (exact),
multiplying in float32 and rounding the result to bfloat16 once gives what the library's
bfloat16 product gives, which also sums in float32, up to the order of the sums.

`WideProducts` is a torch.compile backend that makes that rewrite in the traced graph, for the
`F.linear` products of two or more rows with bfloat16 (or float16) weights on the CPU, at each
shape where timing on this machine finds the float32 product faster: where the CPU has bfloat16
arithmetic, the library's own product wins and stays. One-row products are decoding's
(`cpu_decoding`). The model's code, and eager runs, are untouched; use it as

    gpt2_decl.compile(model, freeze=True, backend=WideProducts())

Gradients flow through the widened product (in float32, rounded back to the weight's dtype).

`WideLinear` does the same for eager products within it, and also widens weight-only int8
weights (`gpt2_decl.quantize`: torchao's product of many rows dequantizes to bfloat16 and
multiplies in bfloat16): compiled CPU generation runs a long prompt within it where
`cpu_decoding.choice_for` timed that faster.
"""

import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from gpt2_decl.core.compiling import inductor_options
from gpt2_decl.speedups.quantize import int8_rows, quantizes_activations
from gpt2_decl.speedups.row_kernels import LinearMode

# The weights whose products may be widened.
NARROW = (torch.bfloat16, torch.float16)
# A product's timing uses at most this many of its weight's rows (the output head's 50257
# would take seconds where the library emulates bfloat16): time grows with them evenly.
TIMED_ROWS = 4096
RUNS = 5


def wide_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` with its operands widened to float32 (an int8 weight dequantized to it), the
    result rounded to `x`'s dtype."""
    wide_bias = None if bias is None else bias.float()
    return F.linear(x.float(), wide_weight(weight), wide_bias).to(x.dtype)


def wide_weight(weight: Tensor) -> Tensor:
    """`weight` in float32: a weight-only int8 weight's rows as (qdata - zero_point) * scale."""
    rows = int8_rows(weight)
    if rows is None:
        return weight.float()
    qdata, scale, zero_point = rows
    return (qdata.float() - zero_point.float()) * scale.float()


def widens(weight: object) -> bool:
    """Whether `wide_linear` is for products with `weight`: a plain bfloat16 or float16 weight,
    or a weight-only int8 one (int8-dynamic products round their input to int8 first)."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return False
    if is_traceable_wrapper_subclass(weight):
        return int8_rows(weight) is not None and not quantizes_activations(weight)
    return weight.dtype in NARROW


class WideLinear(LinearMode):
    """Within it, eager `F.linear` products of `min_rows` to `max_rows` rows on the CPU with a
    weight that `widens` go through `wide_linear`, where no gradient is being recorded."""

    def __init__(self, max_rows: int, min_rows: int = 2):
        super().__init__()
        self.min_rows, self.max_rows = min_rows, max_rows

    def takes(self, rows: int, x: Tensor, weight: Tensor) -> bool:
        return widens(weight) and x.dtype == weight.dtype \
            and self.min_rows <= rows <= self.max_rows

    def product(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return wide_linear(x, weight, bias)


# (rows, in_features, out_features timed, dtype, threads) -> (wide ms, library's ms), medians.
_times: dict[tuple, tuple[float, float]] = {}


@dataclass(frozen=True)
class RewriteThen:
    """A torch.compile backend that rewrites the traced graph in place, each call that
    `replacement` gives a replacement for, then hands it to `then` (a backend), or to inductor
    in torch.compile's `mode` (equal objects share Dynamo's compiled graphs)."""

    then: Callable | None = None
    mode: str = "default"

    def __call__(self, graph_module: fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        self.rewrite(graph_module)
        if self.then is not None:
            return self.then(graph_module, example_inputs)
        return compile_fx(graph_module, example_inputs,
                          config_patches=inductor_options(list_mode_options(self.mode)))

    def rewrite(self, graph_module: fx.GraphModule) -> int:
        """Make each call that has a replacement call it instead; how many were."""
        rewritten = 0
        for node in graph_module.graph.nodes:
            target = self.replacement(node)
            if target is not None:
                node.target = target
                rewritten += 1
        graph_module.recompile()
        return rewritten

    def replacement(self, node: fx.Node) -> Callable | None:
        """What the node is to call instead; None to leave it as it is."""
        raise NotImplementedError


@dataclass(frozen=True)
class WideProducts(RewriteThen):
    """The backend (`RewriteThen`: then `then`, or inductor in `mode`): the products that time
    faster widened."""

    def replacement(self, node: fx.Node) -> Callable | None:
        if node.op != "call_function" or node.target is not F.linear:
            return None
        shape = _narrow_product(node)
        return wide_linear if shape is not None and widening_wins(*shape) else None


def widening_wins(rows: int, in_features: int, out_features: int, dtype: torch.dtype) -> bool:
    """Whether `wide_linear` beats the library's product of `rows` rows with a weight of this
    shape and dtype on this machine (timed once per shape and thread count in a process)."""
    wide_ms, library_ms = time_product(rows, in_features, out_features, dtype)
    return wide_ms < library_ms


def time_product(rows: int, in_features: int, out_features: int, dtype: torch.dtype
                 ) -> tuple[float, float]:
    """Median milliseconds of the product widened and the library's, runs taken in turns, on
    random operands (at most TIMED_ROWS weight rows, and the product's bias)."""
    out_features = min(out_features, TIMED_ROWS)
    key = (rows, in_features, out_features, dtype, torch.get_num_threads())
    if key not in _times:
        generator = torch.Generator().manual_seed(0)
        x, weight = (torch.randn(size, generator=generator).to(dtype)
                     for size in ((rows, in_features), (out_features, in_features)))
        bias = torch.zeros(out_features, dtype=dtype)
        _times[key] = medians_in_turns([lambda: wide_linear(x, weight, bias),
                                        lambda: F.linear(x, weight, bias)], RUNS)
    return _times[key]


def medians_in_turns(calls: list[Callable], runs: int) -> tuple[float, ...]:
    """Median milliseconds of each call, run in turns `runs` times with no gradient recorded,
    after one untimed turn that warms them up."""
    times: list[list[float]] = [[] for _ in calls]
    with torch.no_grad():
        for run in range(runs + 1):
            for call, taken in zip(calls, times, strict=True):
                start = time.perf_counter()
                call()
                if run:
                    taken.append((time.perf_counter() - start) * 1e3)
    return tuple(statistics.median(taken) for taken in times)


def timings() -> dict[tuple, tuple[float, float]]:
    """What this process has timed: (rows, in_features, out_features, dtype, threads) ->
    (widened ms, library's ms)."""
    return dict(_times)


def describe(times: dict[tuple, tuple[float, float]] | None = None) -> str:
    """`times` (by default all of this process's timings) in words, a line per product shape."""
    return describe_timings(_times if times is None else times, "widened", "widened",
                            "no bfloat16 products of two or more rows timed")


def describe_timings(times: dict[tuple, tuple[float, float]], way: str, way_ms: str,
                     nothing: str, other: str = "library", other_ms: str = "the library's"
                     ) -> str:
    """A line per shape of timings keyed (*sizes, dtype, threads) -> (`way`'s ms, `other`'s
    ms): the sizes, the dtype and which was faster; `nothing` where there are none."""
    parts = [f"{'x'.join(str(size) for size in key[:-2])} "
             f"{str(key[-2]).removeprefix('torch.')}: "
             f"{way if ours < theirs else other} ({ours:.2f} ms {way_ms}, "
             f"{theirs:.2f} ms {other_ms})"
             for key, (ours, theirs) in times.items()]
    return "\n".join(parts) or nothing


def _narrow_product(linear: fx.Node) -> tuple[int, int, int, torch.dtype] | None:
    """(rows, in_features, out_features, dtype) of a product of two or more rows with a
    bfloat16 or float16 weight on the CPU; None for any other."""
    x, weight = example_value(linear.args[0]), linear_weight(linear)
    if x is None or weight is None or weight.dim() != 2 or x.dim() < 2:
        return None
    # A quantized weight (a tensor subclass) has products of its own.
    if weight.dtype not in NARROW or x.dtype != weight.dtype \
            or is_traceable_wrapper_subclass(weight):
        return None
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = math.prod(optimization_hint(size, fallback=1024) for size in x.shape[:-1])
    if rows < 2:
        return None
    out_features, in_features = (int(size) for size in weight.shape)
    return rows, in_features, out_features, weight.dtype


def example_value(node: object) -> Tensor | None:
    """The tensor a traced graph's node stood for while tracing; None for anything else."""
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, Tensor) else None


def attention_options(attention: fx.Node) -> tuple[object, object, object]:
    """The `attn_mask`, `dropout_p` and `is_causal` of a traced
    `F.scaled_dot_product_attention`, however they were passed."""
    args, kwargs = attention.args, attention.kwargs
    return (kwargs.get("attn_mask", args[3] if len(args) > 3 else None),
            kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0),
            kwargs.get("is_causal", args[5] if len(args) > 5 else False))


def linear_weight(linear: fx.Node) -> Tensor | None:
    """The weight of a traced `F.linear`, however it was passed."""
    return example_value(linear.args[1] if len(linear.args) > 1 else linear.kwargs.get("weight"))
