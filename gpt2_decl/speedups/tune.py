"""Measuring which CPU speed-ups pay for a model on this machine: `tune` makes a `Plan`.

Each speed-up is timed against what it replaces, on the model's own weights and shapes, with
`core.timing.time_in_turns` (medians of runs taken in turns), and used only where it was faster.
"""

import functools
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2_decl.core import timing
from gpt2_decl.speedups import gemv
from gpt2_decl.speedups.decoding import DecodeStep
from gpt2_decl.speedups.machine import this_machine
from gpt2_decl.speedups.padded_vocab import padded_rows, pads
from gpt2_decl.speedups.plan import Choice, Plan, PlanError, describe_model
from gpt2_decl.speedups.quantize import int8_rows
from gpt2_decl.speedups.rewrites import LinearMode
from gpt2_decl.speedups.upcast import UpcastLinear, upcast_weight, upcasts

RUNS = 5
# One-query attention is timed over a cache of this many keys (or the context), half visible.
ATTENTION_CACHE_LEN = 512
# A product is timed on at most this many of its weight's rows (the output head's 50257 would
# take seconds where bfloat16 is emulated): time grows with them evenly, and is scaled back.
TIMED_OUT_FEATURES = 4096


def tune(model: nn.Module, *, batch: int = 1, seq: int = 128, decoding: bool = True,
         runs: int = RUNS) -> Plan:
    """Time each CPU speed-up that applies to `model` on this machine, for forward passes of
    [batch, seq] tokens and (with `decoding`) for generating `batch` rows after prompts of
    `seq` tokens, and make the plan that uses the winners. Takes seconds; with `decoding`, a
    minute or two for GPT-2 small (the decoding step is compiled each way)."""
    if model.device.type != "cpu":
        raise PlanError(f"tune makes a plan for a model on the CPU; this one is on "
                        f"{model.device}, where the CPU speed-ups do not apply: compile it "
                        "plain (gpt2_decl.compile(model))")
    for name, value in (("batch", batch), ("seq", seq), ("runs", runs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if seq > model.config.n_ctx:
        raise ValueError(f"seq={seq} is longer than the context of {model.config.n_ctx} (n_ctx)")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            upcast = _upcast_products(model, batch * seq, runs)
            choices = [upcast, _padded_vocab(model, batch * seq, runs, upcast.used)]
            if decoding:
                choices += _step_products(model, batch, runs)
                choices.append(_upcast_attention(model, batch, runs))
                choices += _prompt_products(model, batch, seq, runs)
    finally:
        model.train(was_training)
    return Plan(describe_model(model), batch, seq, this_machine(), tuple(choices), decoding)


def _linears(model: nn.Module) -> list[nn.Linear]:
    """One block's linear layers and the output head: the products of a forward pass, up to
    the block repeated n_layer times."""
    return [*(module for module in model.blocks[0].modules() if isinstance(module, nn.Linear)),
            model.lm_head]


def _model_ms(model: nn.Module, times: dict[str, list[float]]) -> dict[str, float]:
    """Milliseconds of the whole model's products, from each way's [one block's, the head's
    timed rows'] milliseconds."""
    scale = model.config.vocab_size / min(model.config.vocab_size, TIMED_OUT_FEATURES)
    return {way: model.config.n_layer * block + scale * head for way, (block, head) in
            times.items()}


def _time_products(model: nn.Module, rows: int, ways: dict[str, Callable], runs: int,
                   head_rows: int | None = None) -> dict[str, float]:
    """Each way's milliseconds for the model's products of `rows` rows (the head's of
    `head_rows`, if given), eager: way(x, weight, bias) for one block's weights and for the
    head's first rows."""
    generator = torch.Generator().manual_seed(0)
    linears = _linears(model)
    weights = [linear.weight if linear is not model.lm_head else _head_rows(model)
               for linear in linears]
    head_rows = rows if head_rows is None else head_rows
    inputs = [torch.randn(head_rows if linear is model.lm_head else rows, linear.in_features,
                          generator=generator).to(model.dtype) for linear in linears]
    prepared = {way: [make(weight) for weight in weights] for way, (make, _) in ways.items()}

    def products(way: str, part: slice) -> None:
        product = ways[way][1]
        for x, weight, linear in list(zip(inputs, prepared[way], linears, strict=True))[part]:
            product(x, weight, None if linear.bias is None else linear.bias)

    calls = {f"{way} {part}": functools.partial(products, way, slice_)
             for way in ways for part, slice_ in (("block", slice(0, -1)),
                                                  ("head", slice(-1, None)))}
    timed = timing.time_in_turns(calls, runs=runs)
    return _model_ms(model, {way: [timed[f"{way} block"].median_ms, timed[f"{way} head"].median_ms]
                             for way in ways})


def _head_rows(model: nn.Module) -> Tensor:
    """The output head's first TIMED_OUT_FEATURES rows, as quantized as the head itself."""
    head = model.lm_head
    if int8_rows(head.weight) is None:
        return head.weight[:TIMED_OUT_FEATURES]
    return head.weight  # a quantized head is timed whole: its int8 rows are a quarter of float's


def _identity(weight: Tensor) -> Tensor:
    return weight


def _upcast_products(model: nn.Module, rows: int, runs: int) -> Choice:
    """Forward passes' GEMMs upcast to float32 (with frozen weights: upcast once) against the
    library's, at `rows` rows."""
    weight = model.lm_head.weight
    if rows < 2 or not upcasts(torch.empty(2, 1, dtype=model.dtype), weight):
        return Choice("upcast_products", False, note=f"{_weights(model)} weights, {rows} rows: "
                      "no GEMM to upcast")
    times = _time_products(model, rows, {
        "upcast": (upcast_weight, lambda x, w, b: F.linear(
            x.float(), w, None if b is None else b.float()).to(x.dtype)),
        "library": (_identity, F.linear)}, runs)
    return Choice("upcast_products", times["upcast"] < times["library"], times)


def _padded_vocab(model: nn.Module, rows: int, runs: int, upcast: bool) -> Choice:
    """The output head's GEMM with its vocabulary padded (and, with frozen weights, padded
    once) against the library's, at `rows` rows, in float32 where the plan upcasts."""
    weight = model.lm_head.weight
    if int8_rows(weight) is not None:
        return Choice("padded_vocab", False, note="int8 weights: the padding is for float heads")
    x = torch.randn(rows, model.config.d_model, generator=torch.Generator().manual_seed(0))
    if not pads(x.to(model.dtype), weight, None):
        return Choice("padded_vocab", False, note=f"{_weights(model)} weights of "
                      f"{weight.shape[0]} rows, {rows} rows in: no head to pad")
    weight = upcast_weight(weight) if upcast else weight
    x, padded = x.to(weight.dtype), padded_rows(weight)
    timed = timing.time_in_turns({  # in the order the graph runs them: cast, then slice
        "padded": lambda: F.linear(x, padded).to(model.dtype)[..., :weight.shape[0]],
        "library": lambda: F.linear(x, weight).to(model.dtype)}, runs=runs)
    times = {way: t.median_ms for way, t in timed.items()}
    return Choice("padded_vocab", times["padded"] < times["library"], times)


def _prompt_products(model: nn.Module, batch: int, seq: int, runs: int) -> list[Choice]:
    """A prompt's products, eager before decoding (the blocks' of batch x seq rows, the output
    head's of batch: the last token's), upcast (each weight at every call) and through the GEMV
    kernel, each against the library's. The fastest of the three is used."""
    ways = {"library": (_identity, F.linear)}
    notes = {}
    if batch * seq >= 2 and upcasts(torch.empty(2, 1, dtype=model.dtype), model.lm_head.weight):
        ways["upcast"] = (_identity, _within(UpcastLinear))
    else:
        notes["upcast"] = f"{_weights(model)} weights, {batch * seq} rows: no GEMM to upcast"
    try:
        gemv.load()
        ways["gemv_kernel"] = (_identity, _within(gemv.GemvLinear))
    except gemv.KernelUnavailable as error:
        notes["gemv_kernel"] = str(error)
    times = _time_products(model, batch * seq, ways, runs, head_rows=batch)
    fastest = min(times, key=times.__getitem__)
    return [Choice(choice, fastest == way, {way: times[way], "library": times["library"]}
                   if way in times else {}, notes.get(way, ""))
            for choice, way in (("upcast_prompt", "upcast"), ("gemv_prompt", "gemv_kernel"))]


def _within(mode: type[LinearMode]) -> Callable:
    """F.linear(x, weight, bias) within `mode`, as the prompt runs its products."""
    def product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        with mode():
            return F.linear(x, weight, bias)

    return product


def _weights(model: nn.Module) -> str:
    return "int8" if int8_rows(model.lm_head.weight) is not None else \
        str(model.dtype).removeprefix("torch.")


class _StepProducts(nn.Module):
    """The products of a decoding step, with the model's own linear layers (shared)."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.linears = nn.ModuleList(linears)

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        return [linear(x) for linear, x in zip(self.linears, inputs, strict=True)]


def _step_products(model: nn.Module, rows: int, runs: int) -> list[Choice]:
    """A decoding step's products of `rows` rows, compiled over frozen weights through the GEMV
    kernel, and with inductor's C++ GEMM template, each against the library's. The faster of
    the two that beat the library is used."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(rows, 1, linear.in_features, generator=generator).to(model.dtype)
              for linear in linears]
    ways = {"library": DecodeStep()}
    notes = {}
    if int8_rows(model.lm_head.weight) is None:
        ways["gemm_template"] = DecodeStep(gemm_template=True)
    else:
        notes["gemm_template"] = "int8 weights: the template multiplies float weights"
    try:
        notes["gemv_kernel"] = gemv.load()
        ways["gemv_kernel"] = DecodeStep(gemv_kernel=True)
    except gemv.KernelUnavailable as error:
        notes["gemv_kernel"] = str(error)
    calls = {way: functools.partial(_compiled_products(linears, step), inputs)
             for way, step in ways.items()}
    timed = {way: taken.median_ms
             for way, taken in timing.time_in_turns(calls, runs=runs).items()}
    winners = [way for way in ways if way != "library" and timed[way] < timed["library"]]
    fastest = min(winners, key=timed.__getitem__) if winners else None
    return [Choice(way, way == fastest, {way: timed[way], "library": timed["library"]}
                   if way in timed else {}, notes.get(way, ""))
            for way in ("gemm_template", "gemv_kernel")]


def _compiled_products(linears: list[nn.Linear], step: DecodeStep) -> Callable:
    """The step's products compiled with `step`'s backend, through a fresh copy of the code
    (Dynamo keeps graphs per code object), the weights frozen where `step` freezes them."""
    products = _StepProducts(linears)
    products.forward = types.MethodType(_fresh(_StepProducts.forward), products)
    compiled = torch.compile(products, backend=step, fullgraph=True, dynamic=False)

    def call(inputs: list[Tensor]) -> object:
        with torch._inductor.config.patch(freezing=step.freezes):
            return compiled(inputs)

    return call


def _upcast_attention(model: nn.Module, rows: int, runs: int) -> Choice:
    """One query's attention in every layer, over a cache of ATTENTION_CACHE_LEN keys (half
    visible), compiled upcast to float32 and as the library does it."""
    config = model.config
    length = min(config.n_ctx, ATTENTION_CACHE_LEN)
    visible = (torch.arange(length) < length // 2 + 1).expand(rows, 1, 1, length)
    generator = torch.Generator().manual_seed(0)

    def heads(seq: int) -> Tensor:
        return torch.randn(rows, config.n_head, seq, config.d_head,
                           generator=generator).to(model.dtype)

    calls = [(heads(1), heads(length), heads(length), visible) for _ in range(config.n_layer)]
    ways = {"upcast": DecodeStep(upcast_attention=True), "library": DecodeStep()}
    compiled = {way: torch.compile(_fresh(_attention), backend=step, fullgraph=True,
                                   dynamic=False) for way, step in ways.items()}

    def layers(way: str) -> None:
        for arguments in calls:
            compiled[way](*arguments)

    timed = timing.time_in_turns({way: functools.partial(layers, way) for way in ways}, runs=runs)
    times = {way: taken.median_ms for way, taken in timed.items()}
    return Choice("upcast_attention", times["upcast"] < times["library"], times)


def _attention(q: Tensor, keys: Tensor, values: Tensor, visible: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)


def _fresh(function: Callable) -> Callable:
    """`function` with a copy of its code: a code object of its own for Dynamo's graphs."""
    return types.FunctionType(function.__code__.replace(), function.__globals__)
