"""GELU's tanh approximation computed through a sigmoid, in compiled CPU graphs.

GPT-2's GELU is 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), and 0.5 (1 +
tanh(u)) = sigmoid(2u): the same function, x * sigmoid(2u). On a CPU, inductor's vectorised
tanh (accurate to about an ulp) costs several times the exponential a sigmoid takes, so the
sigmoid form of the MLP's GELU runs faster where the compiled forward otherwise spends a
notable part of its pointwise time; both stay within float32's rounding of float64's GELU.

`SigmoidGelu` is a torch.compile backend that makes the rewrite in the traced graph, for every
`F.gelu(x, approximate="tanh")` on the CPU in a dtype where timing on this machine finds the
sigmoid form faster (each form compiled by inductor alone, on the same elements); then it hands
the graph on (to inductor, or to another backend). Gradients flow through either form. The
model's code and eager runs, where the library's single GELU kernel is the faster, are
untouched; use it as

    gpt2_decl.compile(model, freeze=True, backend=SigmoidGelu())
    gpt2_decl.compile(model, freeze=True, backend=SigmoidGelu(then=KernelAttention()))
"""

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from gpt2_decl.speedups.wide_products import (
    RewriteThen,
    describe_timings,
    example_value,
    medians_in_turns,
)

# 2 sqrt(2 / pi), and 2 sqrt(2 / pi) * 0.044715: 2u = x (TWICE_SCALE + TWICE_CUBIC x^2).
TWICE_SCALE = 2 * math.sqrt(2 / math.pi)
TWICE_CUBIC = TWICE_SCALE * 0.044715
# The elements both forms are timed on: a few MiB, as a GPT-2 MLP's activations at a few
# hundred tokens (the forms' cost per element does not depend on the shape).
TIMED_SHAPE = (512, 3072)
RUNS = 5
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sigmoid_gelu(input: Tensor, approximate: str = "tanh") -> Tensor:
    """`F.gelu(input, approximate="tanh")` as input * sigmoid(2u)."""
    if approximate != "tanh":
        raise ValueError(f"sigmoid_gelu is GELU's tanh approximation, got approximate="
                         f"{approximate!r}")
    return input * torch.sigmoid(input * (TWICE_SCALE + TWICE_CUBIC * input * input))


@dataclass(frozen=True)
class SigmoidGelu(RewriteThen):
    """The backend (`RewriteThen`: then `then`, or inductor in `mode`): the tanh GELUs through
    a sigmoid where that times faster."""

    def replacement(self, node: fx.Node) -> Callable | None:
        dtype = _cpu_tanh_gelu(node)
        return sigmoid_gelu if dtype is not None and sigmoid_wins(dtype) else None


# (*TIMED_SHAPE, dtype, threads) -> (sigmoid form's ms, tanh form's ms), medians.
_times: dict[tuple, tuple[float, float]] = {}


def sigmoid_wins(dtype: torch.dtype) -> bool:
    """Whether the sigmoid form compiles faster than the tanh form in `dtype` on this machine
    (timed once per dtype and thread count in a process)."""
    sigmoid_ms, tanh_ms = time_gelu(dtype)
    return sigmoid_ms < tanh_ms


def time_gelu(dtype: torch.dtype) -> tuple[float, float]:
    """Median milliseconds of each form, compiled by inductor, on TIMED_SHAPE random elements
    of `dtype`, runs taken in turns."""
    key = (*TIMED_SHAPE, dtype, torch.get_num_threads())
    if key not in _times:
        x = torch.randn(TIMED_SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)
        forms = [_compiled(_sigmoid_form, x), _compiled(_tanh_form, x)]
        _times[key] = medians_in_turns([lambda form=form: form(x) for form in forms], RUNS)
    return _times[key]


def timings() -> dict[tuple, tuple[float, float]]:
    """What this process has timed: (*TIMED_SHAPE, dtype, threads) -> (sigmoid form's ms, tanh
    form's ms)."""
    return dict(_times)


def describe(times: dict[tuple, tuple[float, float]] | None = None) -> str:
    """`times` (by default all of this process's timings) in words, a line per dtype."""
    return describe_timings(_times if times is None else times, "sigmoid",
                            "the sigmoid form's", "no GELU timed", "tanh", "the tanh form's")


def _sigmoid_form(x: Tensor) -> Tensor:
    return sigmoid_gelu(x)


def _tanh_form(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _compiled(function: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[Tensor], Tensor]:
    """`function` of one tensor compiled by inductor alone (traced by torch.fx, not Dynamo:
    no guards, caches or recompilation limits of its own)."""
    from torch._inductor.compile_fx import compile_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_fx(fx.symbolic_trace(function), [x])


def _cpu_tanh_gelu(node: fx.Node) -> torch.dtype | None:
    """The dtype of a traced tanh GELU of a floating-point tensor on the CPU; None for any
    other node."""
    if node.op != "call_function" or node.target is not F.gelu:
        return None
    approximate = node.args[1] if len(node.args) > 1 else node.kwargs.get("approximate", "none")
    x = example_value(node.args[0]) if node.args else None
    if approximate != "tanh" or x is None or x.device.type != "cpu" or x.dtype not in DTYPES:
        return None
    return x.dtype
