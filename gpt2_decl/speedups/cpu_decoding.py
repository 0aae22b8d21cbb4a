"""Faster one-token decoding steps on a CPU: a `torch.compile` backend that rewrites the graph.

The model's layers compute a step the general way (`F.linear`, `scaled_dot_product_attention`).
For a single token on a CPU, some of them can run better written otherwise, so this backend
rewrites them in the traced graph before inductor compiles it; the model's code, and eager
runs, are untouched:

- one_row_products: a product of one row with a weight matrix becomes a multiply and a sum,
  accumulated in float32, which inductor streams over the weight in one pass, where the BLAS
  matrix-vector product it replaces reads memory slower (bfloat16, int8). An int8 weight
  (`gpt2_decl.quantize`) is streamed as int8, and its rows scaled after the sum.
- one_query_attention: attention of one query per head becomes two float32 matmuls around a
  masked softmax, instead of the CPU attention kernel, which is slow for one bfloat16 query.
- packed_products: the float weights become constants of the compiled step, laid out once for
  their products, and inductor's max-autotune picks each product's kernel by timing its C++
  GEMM templates against ATen's on the machine (batches of rows gain most: the BLAS product
  of a few rows reads its weight far slower than a prepacked one). Frozen weights are not
  updated by training: generation compiles such a model unfrozen once its weights changed.
- kernel_products: the products of one or a few rows go to a C++ kernel (`row_kernels`) that
  streams each weight in blocks of rows, prefetching the next block, and multiplies a block by
  every row while it is in cache: float32, bfloat16 and int8 weights, summed in float32.
- kernel_attention: attention of one query per head goes to a C++ kernel (`row_kernels`) that
  reads only the keys and values the mask shows: the cache as far as it is filled, where the
  compiled step's fixed shapes would have it read whole at every token.
- store_pointwise: inductor stores every pointwise result (LayerNorm, GELU) instead of
  recomputing it inside each loop that reads it, which would be once per weight row; the
  generated code's per-call size asserts are dropped too (Dynamo's guards check the inputs).
- freeze_weights: the weights become constants of the compiled step (inductor's freezing), for
  int8 products with int8 activations ("int8-dynamic"): inductor then lays each int8 weight
  out for its integer matrix product once, when compiling, instead of at every step. Those
  products are left as they are by one_row_products (theirs round the input to int8 first).
  Weight-only int8 weights are frozen too where the kernel does their products: the step then
  unwraps torchao's int8 tensors once, not at every call.

Whether a rewrite wins depends on the machine: a BLAS that reads float32 rows fast makes the
one-row product lose there, while it wins in bfloat16. So `choice_for` times each rewrite
against the library call it replaces, on the model's own weights and at the generation's
number of rows, once per kind of model in a process, and `gpt2_decl.text.generation` compiles
CPU decoding with what it chose; `store_pointwise` and `freeze_weights` are rules. The README
gives the figures.

The prompt is run eagerly (a compiled graph per prompt length would cost more than it saves);
`choice_for` also times the kernel and widened products (`wide_products`: float32 products of
bfloat16 or int8 weights) against the library's products at a short, a long and a whole
context's number of rows, and generation runs the prompt's products through the kernel
(`row_kernels.KernelProducts`) up to the most rows at which it was fastest, and widened
(`wide_products.WideLinear`) past those up to the most at which that was: bfloat16 products of
many rows are slow where the CPU has no bfloat16 arithmetic, and torchao's int8 products
dequantize the whole weight to bfloat16 first. It times a prompt's attention too, the causal
kernel against the library's under the cache's mask, and generation runs prompts through the
kernel (`causal_attention.EagerKernelAttention`) from the length on which it was faster.
"""

import functools
import math
import statistics
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from gpt2_decl.core.compiling import inductor_options
from gpt2_decl.speedups import causal_attention, row_kernels, wide_products
from gpt2_decl.speedups.quantize import int8_rows, is_quantized, quantizes_activations
from gpt2_decl.speedups.wide_products import attention_options, example_value, linear_weight


def one_row_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` of a single row, as a multiply and a float32 sum over the weight's rows (an
    int8 weight's rows are read as int8, and scaled once each)."""
    rows = int8_rows(weight)
    if rows is None:
        product = (x[..., None, :].float() * weight.float()).sum(-1)
    else:
        qdata, scale, zero_point = rows
        centred = qdata.float() - zero_point.float()
        product = (x[..., None, :].float() * centred).sum(-1) * scale.float().flatten()
    product = product.to(x.dtype)
    return product if bias is None else product + bias


def one_query_attention(
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
class CpuDecoding:
    """Which rewrites to make (all by default); `backend` is the torch.compile backend."""

    one_row_products: bool = True
    one_query_attention: bool = True
    packed_products: bool = False
    kernel_products: bool = False
    kernel_attention: bool = False
    store_pointwise: bool = True
    freeze_weights: bool = False  # see CompiledGPT2: frozen weights are set while tracing

    def names(self) -> list[str]:
        return [field.name for field in fields(self) if getattr(self, field.name)]

    @property
    def freezes(self) -> bool:
        """Whether the step is compiled with the weights frozen into it."""
        return self.freeze_weights or self.packed_products

    def unfrozen(self) -> "CpuDecoding":
        """These rewrites without frozen weights, as one object per settings (Dynamo reuses the
        graphs of the same backend object only)."""
        return _unfrozen(self)

    def rewrite(self, graph_module: fx.GraphModule) -> dict[str, int]:
        """Rewrite `graph_module` in place; how many nodes of each kind were rewritten."""
        counts = {"one_row_products": 0, "one_query_attention": 0, "kernel_products": 0,
                  "kernel_attention": 0}
        # The kernels are built on first use; where they cannot be, the graph stays as it is.
        loaded = (self.kernel_products or self.kernel_attention) and row_kernels.load() is None
        kernel, kernel_attention = loaded and self.kernel_products, loaded and self.kernel_attention
        for node in graph_module.graph.nodes:
            if node.op != "call_function":
                continue
            if kernel and node.target is F.linear and _is_cpu_rows(node) \
                    and _kernel_reads_weight(node):
                node.target = row_kernels.kernel_linear
                counts["kernel_products"] += 1
            elif self.one_row_products and node.target is F.linear and _is_one_cpu_row(node) \
                    and not _rounds_input_to_int8(node):
                node.target = one_row_linear
                counts["one_row_products"] += 1
            elif node.target is F.scaled_dot_product_attention and _is_one_query_over_a_mask(node):
                if kernel_attention and row_kernels.attends(example_value(node.args[1])):
                    node.target = row_kernels.kernel_attention
                    counts["kernel_attention"] += 1
                elif self.one_query_attention:
                    node.target = one_query_attention
                    counts["one_query_attention"] += 1
        graph_module.recompile()
        return counts

    def backend(self, graph_module: fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        self.rewrite(graph_module)
        options = {"realize_acc_reads_threshold": 0, "size_asserts": False} \
            if self.store_pointwise else {}
        with warnings.catch_warnings():  # raised from inside inductor's autotuning
            warnings.filterwarnings("ignore", "TypedStorage is deprecated")
            return compile_fx(graph_module, example_inputs,
                              config_patches=inductor_options(
                                  options | (PACKED if self.packed_products else {})))


# Inductor's settings for packed products (with frozen weights): each product's kernel is
# chosen by timing inductor's C++ GEMM templates against ATen's prepacked call (quietly: its
# timings would otherwise be written to stderr, amid generated text).
PACKED = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
          "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


@functools.cache
def _unfrozen(decoding: CpuDecoding) -> CpuDecoding:
    return replace(decoding, packed_products=False, freeze_weights=False)


# What each measured rewrite is timed on, per alternative: this many runs, taken in turns.
CHOICE_RUNS = 5
# The cache length one-query attention is timed at (or the context, if shorter).
CHOICE_CACHE_LEN = 512


@dataclass(frozen=True)
class Choice:
    """The rewrites chosen for a kind of model on this machine, and the median milliseconds per
    token's worth of work that chose them: times_ms[rewrite] = (with it, without it)."""

    decoding: CpuDecoding
    times_ms: dict[str, tuple[float, float]]
    # A prompt's products go through the kernel up to prefill_rows rows, widened past those up
    # to prefill_wide_rows (0: never); prefill_times_ms[rows][way] is one block's products.
    prefill_rows: int = 0
    prefill_wide_rows: int = 0
    prefill_times_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    # A prompt's attention goes through the causal kernel from prefill_attention_from tokens on
    # (0: never); prefill_attention_times_ms[seq] = (kernel's, library's) for one layer.
    prefill_attention_from: int = 0
    prefill_attention_times_ms: dict[int, tuple[float, float]] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [f"{name} {'on' if getattr(self.decoding, name) else 'off'} "
                 f"({with_it:.2f} ms with, {without:.2f} ms without)"
                 for name, (with_it, without) in self.times_ms.items()]
        rules = [name for name in self.decoding.names() if name not in self.times_ms]
        parts += [f"{name} on (a rule)" for name in rules]
        if self.prefill_times_ms:
            kernel = f"up to {self.prefill_rows} rows" if self.prefill_rows else "off"
            wide = f"up to {self.prefill_wide_rows} rows" if self.prefill_wide_rows else "off"
            timed = ", ".join(
                f"at {rows} rows " + " ".join(f"{way} {ms:.2f}" for way, ms in ways.items())
                for rows, ways in self.prefill_times_ms.items())
            parts.append(f"prompt through the kernel {kernel}, widened {wide} (ms: {timed})")
        if self.prefill_attention_times_ms:
            start = "off" if not self.prefill_attention_from else \
                f"from {self.prefill_attention_from} tokens"
            timed = ", ".join(f"at {seq} tokens kernel {kernel:.2f} library {library:.2f}"
                              for seq, (kernel, library)
                              in self.prefill_attention_times_ms.items())
            parts.append(f"prompt's attention through the causal kernel {start} (ms: {timed})")
        return "; ".join(parts)


_choices: dict[tuple, Choice] = {}


def choice_for(model: nn.Module, rows: int = 1) -> Choice:
    """The rewrites that make `model`'s compiled decoding step of `rows` rows faster on this
    machine: each measured rewrite is timed with and without on the model's weights (cached per
    kind of model: its configuration, dtype, kinds of weights, rows and torch's thread count)."""
    key = (model.config, model.dtype, rows, torch.get_num_threads(),
           tuple((type(parameter), quantizes_activations(parameter))
                 for parameter in model.parameters()))
    if key not in _choices:
        _choices[key] = _choose(model, rows)
    return _choices[key]


def _choose(model: nn.Module, rows: int) -> Choice:
    # Products that round their input to int8 are not rewritten: they want frozen weights.
    freeze = any(quantizes_activations(parameter) for parameter in model.parameters())
    with torch.no_grad():
        times = {} if freeze else _time_products(model, rows)
        times |= _time_attention(model)
    chosen = {name: with_it < without for name, (with_it, without) in times.items()}
    # The ways that win of doing the same work (the products, attention): the fastest.
    for ways in (PRODUCTS, ATTENTION):
        winners = [name for name in ways if chosen.get(name)]
        if winners:
            fastest = min(winners, key=lambda name: times[name][0])
            chosen |= {name: name == fastest for name in winners}
    # A step that takes torchao's int8 weights as inputs unwraps them from their tensor class at
    # every call; frozen into the step, they are unwrapped once (and the kernel reads them as
    # they are, where one-row products would have them dequantized in a copy).
    freeze = freeze or (bool(chosen.get("kernel_products")) and is_quantized(model))
    decoding = CpuDecoding(one_row_products=False, freeze_weights=freeze)
    with torch.no_grad():
        prefill_times = _time_prefill(model)
        attention_times = _time_prefill_attention(model)
    return Choice(replace(decoding, **chosen), times, *_prefill_limits(prefill_times),
                  prefill_times, _prefill_attention_from(attention_times), attention_times)


# The prompt sizes (rows) at which each way of doing a prompt's products is timed: short, long
# and a whole context of GPT-2's.
PREFILL_ROWS = (32, 256, 1024)


def _time_prefill(model: nn.Module) -> dict[int, dict[str, float]]:
    """Milliseconds for the first block's products of PREFILL_ROWS rows, run eagerly by each
    way that applies: through the kernel, widened, and the library's (medians of runs taken in
    turns); {} where neither the kernel (loaded, reading these weights, and to be timed) nor
    widening applies."""
    linears = [module for module in model.blocks[0].modules() if isinstance(module, nn.Linear)]
    ways: dict[str, Callable] = {}
    if _kernel_does(linears):
        ways["kernel"] = row_kernels.kernel_linear
    if all(wide_products.widens(linear.weight) for linear in linears):
        ways["wide"] = wide_products.wide_linear
    if not ways:
        return {}
    ways["library"] = F.linear
    times = {}
    for rows in PREFILL_ROWS:
        inputs = [torch.randn(rows, linear.in_features, dtype=model.dtype) for linear in linears]

        def products(product: Callable, inputs: list[Tensor] = inputs) -> list[Tensor]:
            return [product(x, linear.weight, linear.bias)
                    for linear, x in zip(linears, inputs, strict=True)]

        times[rows] = _time_in_turns({way: functools.partial(products, product)
                                      for way, product in ways.items()}, [()])
    return times


def _prefill_limits(times: dict[int, dict[str, float]]) -> tuple[int, int]:
    """Prompts of up to how many rows the kernel does the products of, and up to how many
    widened products do past those: the sizes timed, smallest first, take the kernel while it
    was the fastest, then widened products while they were (0: never)."""
    limits = {"kernel": 0, "wide": 0}
    way = "kernel"
    for rows, timed in sorted(times.items()):
        fastest = min(timed, key=lambda name: (timed[name], name != "library"))  # a tie: no win
        if way == "kernel" and fastest == "wide":
            way = "wide"
        if fastest != way:
            break
        limits[way] = rows
    return limits["kernel"], limits["wide"]


def _time_prefill_attention(model: nn.Module) -> dict[int, tuple[float, float]]:
    """Milliseconds for one layer's attention of a prompt of each of PREFILL_ROWS tokens (up to
    the context), through the causal kernel and the library's, with the mask generation gives
    it (medians of runs taken in turns); {} where the kernel does not load or take these heads.
    The prompt fills its cache here: a longer cache, as generation has, adds to the library's
    work only (it computes a score for every key the mask hides), so the kernel wins there
    wherever it wins here."""
    config = model.config
    d_head = config.d_model // config.n_head
    if row_kernels.load() is not None or model.dtype not in causal_attention.DTYPES \
            or not causal_attention.takes_head_size(d_head):
        return {}
    times = {}
    for seq in sorted({min(rows, config.n_ctx) for rows in PREFILL_ROWS}):
        q, k, v = (torch.randn(1, config.n_head, seq, d_head, dtype=model.dtype)
                   for _ in range(3))
        visible = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
        times[seq] = wide_products.medians_in_turns([
            functools.partial(torch.ops.gpt2_decl.causal_attention, q, k, v, d_head ** -0.5),
            functools.partial(F.scaled_dot_product_attention, q, k, v, attn_mask=visible),
        ], CHOICE_RUNS)
    return times


def _prefill_attention_from(times: dict[int, tuple[float, float]]) -> int:
    """From how many tokens on a prompt's attention goes through the kernel: the shortest
    length timed from which on the kernel was faster at every length timed (all prompts if it
    was at the shortest); 0 (never) if it was not at the longest."""
    start = 0
    for seq in sorted(times, reverse=True):
        kernel, library = times[seq]
        if kernel >= library:
            break
        start = seq
    return 1 if start and start == min(times) else start


PRODUCTS = ("one_row_products", "packed_products", "kernel_products")
ATTENTION = ("one_query_attention", "kernel_attention")
# The ways of doing the products that `choice_for` times against the plain ones (where they
# apply): leaving packed_products out saves its autotuning, a minute for GPT-2 small.
PRODUCT_WAYS = PRODUCTS


def _time_products(model: nn.Module, rows: int) -> dict[str, tuple[float, float]]:
    """Milliseconds to multiply `rows` rows by every weight matrix of the model once, as a
    decoding step does, with each way of doing products that applies (one-row products for one
    row, packed products for float weights) and without (medians of runs taken in turns)."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    inputs = [torch.randn(rows, 1, linear.in_features, dtype=model.dtype) for linear in linears]
    none = CpuDecoding(one_row_products=False, one_query_attention=False)
    ways = {"without": none}
    if rows == 1 and "one_row_products" in PRODUCT_WAYS:
        ways["one_row_products"] = replace(none, one_row_products=True)
    if "packed_products" in PRODUCT_WAYS and not is_quantized(model):
        ways["packed_products"] = replace(none, packed_products=True)
    if _kernel_does(linears):
        ways["kernel_products"] = replace(none, kernel_products=True)
    if len(ways) == 1:
        return {}  # nothing to time the plain products against
    times = _time_in_turns({name: _compiled_products(linears, decoding)
                            for name, decoding in ways.items()}, [(inputs,)])
    return {name: (times[name], times["without"]) for name in ways if name != "without"}


def _kernel_does(linears: list[nn.Linear]) -> bool:
    """Whether the kernel is to be timed, loads, and does the products of all of `linears`."""
    return "kernel_products" in PRODUCT_WAYS and row_kernels.load() is None \
        and all(row_kernels.reads(linear.weight) for linear in linears)


class _Products(nn.Module):
    """The products of a decoding step, with the model's own linear layers (shared)."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.linears = nn.ModuleList(linears)

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        return [linear(x) for linear, x in zip(self.linears, inputs, strict=True)]


def _time_attention(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Milliseconds for one query's attention in every layer, over a cache of CHOICE_CACHE_LEN
    keys (half of them visible), with each way of doing it that applies (the kernel where it
    loads) and without (medians of runs taken in turns)."""
    config = model.config
    length = min(config.n_ctx, CHOICE_CACHE_LEN)
    visible = (torch.arange(length) < length // 2 + 1).expand(1, 1, 1, length)

    def heads(seq: int) -> Tensor:
        return torch.randn(1, config.n_head, seq, config.d_model // config.n_head,
                           dtype=model.dtype)

    calls = [(heads(1), heads(length), heads(length), visible) for _ in range(config.n_layer)]
    none = CpuDecoding(one_row_products=False, one_query_attention=False)
    ways = {"without": none, "one_query_attention": replace(none, one_query_attention=True)}
    if row_kernels.load() is None and row_kernels.attends(calls[0][1]):
        ways["kernel_attention"] = replace(none, kernel_attention=True)
    times = _time_in_turns({name: _compiled(_attention, decoding)
                            for name, decoding in ways.items()}, calls)
    return {name: (times[name], times["without"]) for name in ways if name != "without"}


def _attention(q: Tensor, keys: Tensor, values: Tensor, visible: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)


def _time_in_turns(alternatives: dict, calls: list[tuple]) -> dict:
    """Median milliseconds of each alternative over `calls`, the runs taken in turns."""
    times: dict = {name: [] for name in alternatives}
    for run in range(CHOICE_RUNS + 1):  # the first run compiles, and is not counted
        for name, alternative in alternatives.items():
            start = time.perf_counter()
            for args in calls:
                alternative(*args)
            if run:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(times_ms) for name, times_ms in times.items()}


def _compiled(function: Callable, decoding: CpuDecoding) -> Callable:
    """`function` compiled with `decoding`'s backend, through a fresh copy of its code: Dynamo
    keeps its graphs per code object, and would count these against its limit of
    recompilations."""
    return torch.compile(_fresh(function), backend=decoding.backend, fullgraph=True,
                         dynamic=False)


def _compiled_products(linears: list[nn.Linear], decoding: CpuDecoding) -> Callable:
    """`_Products` of `linears` compiled as `_compiled` compiles a function, the weights frozen
    into the graph if `decoding` freezes them (decided while tracing: hence the patch)."""
    products = _Products(linears)
    products.forward = types.MethodType(_fresh(_Products.forward), products)
    compiled = torch.compile(products, backend=decoding.backend, fullgraph=True, dynamic=False)

    def call(*args: object) -> object:
        with torch._inductor.config.patch(freezing=decoding.freezes):
            return compiled(*args)

    return call


def _fresh(function: Callable) -> Callable:
    """`function` with a copy of its code: a code object of its own for Dynamo's graphs."""
    return types.FunctionType(function.__code__.replace(), function.__globals__)


def _cpu_input(node: fx.Node) -> Tensor | None:
    """The example value of the node's first argument, if it is a tensor on the CPU."""
    x = example_value(node.args[0])
    return x if x is not None and x.device.type == "cpu" else None


def _is_one_cpu_row(node: fx.Node) -> bool:
    x = _cpu_input(node)
    return x is not None and math.prod(x.shape[:-1]) == 1


def _is_cpu_rows(node: fx.Node) -> bool:
    x = _cpu_input(node)
    return x is not None and x.dim() >= 2


def _kernel_reads_weight(linear: fx.Node) -> bool:
    weight = linear_weight(linear)
    return weight is not None and row_kernels.reads(weight)


def _rounds_input_to_int8(linear: fx.Node) -> bool:
    weight = linear_weight(linear)
    return weight is not None and quantizes_activations(weight)


def _is_one_query_over_a_mask(node: fx.Node) -> bool:
    q = _cpu_input(node)
    mask_node, dropout, causal = attention_options(node)
    mask = example_value(mask_node)
    return (
        q is not None
        and q.shape[-2] == 1
        and mask is not None
        and mask.dtype == torch.bool
        and dropout == 0.0
        and not causal
    )
