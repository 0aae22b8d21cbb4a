"""C++ kernels for a decoding step on a CPU: the products of a few rows with a weight matrix,
and attention of one query over the keys a mask shows.

Decoding one token reads every weight once, so its products are bound by how fast the weights
stream from memory. The kernel (kernels/row_products.cpp) reads a block of weight rows while it
prefetches the next, and multiplies each block by every input row while the block is in cache
(a batch's rows four at a time, each weight vector loaded feeding four sums); bfloat16 and int8
weights are widened to float32 in registers, and the sums are float32. Where the CPU has VNNI,
int8 weights meet the rows as integers instead: each row split into two int8 digits (what
they miss is far below the int8 weights' own rounding), summed exactly in int32, about a
quarter of the instructions of widening. It is built for this machine (`-march=native`) the
first time it is asked for, with torch's extension builder (a C++ compiler and ninja), and kept
in the cache folder for later processes.

The attention kernel (kernels/visible_attention.cpp) reads only the visible keys and values:
a compiled step has fixed shapes, so without it attention reads the whole cache at every token,
however little of it is filled yet. A third kernel, causal attention of whole sequences
(kernels/causal_attention.cpp), is `causal_attention`'s. All are built into one library.

`cpu_decoding` uses them where they measure faster than the other ways of doing the same work
(the `kernel_products` and `kernel_attention` rewrites); `kernel_linear` and `kernel_attention`
are what it puts in the graph. Generation can also run a prompt's products through the product
kernel, eagerly, within `KernelProducts`, where that measured faster than the library's.
"""

import functools
import hashlib
import math
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from gpt2_decl.speedups.quantize import int8_rows, quantizes_activations

KERNELS = Path(__file__).parent / "kernels"
SOURCES = [KERNELS / "row_products.cpp", KERNELS / "visible_attention.cpp",
           KERNELS / "causal_attention.cpp", KERNELS / "causal_attention_tiles.cpp"]
HEADERS = [KERNELS / "vectors.h", KERNELS / "causal_attention_tiles.h"]
# -ffp-contract=fast: multiply-adds fused, as GNU modes do by default and -std=c++17 does not.
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
# Weights the kernel reads as they are (int8 weights come as torchao's rows and scales).
FLOAT_WEIGHTS = (torch.float32, torch.bfloat16)


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2_decl"


@functools.cache
def load() -> str | None:
    """Build (once per machine and source) and load the kernels; None if they loaded, else why
    not."""
    machine = [platform.machine(), _cpu_features(), torch.__version__]
    code = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(code + " ".join(FLAGS + machine).encode()).hexdigest()
    library = cache_folder() / f"row_products-{key[:16]}.so"
    try:
        if not library.exists():
            _build(library)
        torch.ops.load_library(str(library))
    except Exception as error:  # no compiler, no ninja, or a compiler that refuses the flags
        return f"the C++ kernels could not be built or loaded ({type(error).__name__}: " \
               f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''})"
    _register_fakes()
    return None


def _cpu_features() -> str:
    """What -march=native compiles for: the CPU's feature flags (Linux), else torch's summary;
    a cache shared by machines with other CPUs then holds a library for each."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line for line in cpuinfo if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return torch.backends.cpu.get_cpu_capability()


def _build(library: Path) -> None:
    """Compile into a folder of this process's own, then move the library into place in one
    step: a build killed midway, or two at once, never leaves a partial file where it is read."""
    from torch.utils.cpp_extension import load as build_extension

    library.parent.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="row_products-", dir=library.parent)
    try:
        build_extension("gpt2_decl_row_products", [str(path) for path in SOURCES],
                        extra_cflags=FLAGS,
                        extra_ldflags=["-fopenmp"], build_directory=folder,
                        is_python_module=False, verbose=False)
        os.replace(Path(folder) / "gpt2_decl_row_products.so", library)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@functools.cache
def _register_fakes() -> None:
    """What the kernels return, for torch.compile's tracing: the products float32 [rows,
    out_features], attention (both kinds) the query's shape and dtype."""

    @torch.library.register_fake("gpt2_decl::row_products")
    def _(x: Tensor, weight: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)

    @torch.library.register_fake("gpt2_decl::int8_row_products")
    def _(x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], qdata.shape[0], dtype=torch.float32)

    @torch.library.register_fake("gpt2_decl::visible_attention")
    def _(q: Tensor, keys: Tensor, values: Tensor, visible: Tensor, scale: float) -> Tensor:
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("gpt2_decl::causal_attention")
    def _(q: Tensor, k: Tensor, v: Tensor, scale: float, offset: int = 0, tiles: bool = True
          ) -> Tensor:
        return torch.empty_like(q, memory_format=torch.contiguous_format)


def int8_products_way() -> str | None:
    """How the kernel does int8 products on this machine: "digits" (the input rows split into
    int8 digits, integer dot products: VNNI) or "widened" (the weights widened to float32); None
    without the kernel."""
    return None if load() is not None else torch.ops.gpt2_decl.int8_products_way()


def reads(weight: Tensor) -> bool:
    """Whether the kernel does products with this weight: float32, bfloat16, or torchao's int8
    rows (not those whose products round their input to int8 first)."""
    return weight.dim() == 2 and not quantizes_activations(weight) and (
        weight.dtype in FLOAT_WEIGHTS or int8_rows(weight) is not None)


def kernel_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` of a few rows through the kernel (float32 sums, returned in x's dtype)."""
    rows = x.reshape(-1, x.shape[-1])
    int8 = int8_rows(weight)
    if int8 is None:
        product = torch.ops.gpt2_decl.row_products(rows, weight.contiguous())
    else:
        qdata, scale, zero_point = int8
        product = torch.ops.gpt2_decl.int8_row_products(
            rows, qdata.contiguous(), scale.flatten(), zero_point.flatten())
    product = product.to(x.dtype).reshape(*x.shape[:-1], -1)
    return product if bias is None else product + bias


def kernel_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """`F.scaled_dot_product_attention` of one query per head over a boolean mask of visible
    keys, through the kernel (float32 sums, returned in q's dtype), for float32 or bfloat16
    keys; dropout and a causal mask are not its to do."""
    if attn_mask is None or dropout_p != 0.0 or is_causal:
        raise ValueError("kernel attention takes a boolean mask, and no dropout or causal mask")
    return torch.ops.gpt2_decl.visible_attention(
        q, keys, values, attn_mask, 1 / math.sqrt(q.shape[-1]) if scale is None else scale)


def attends(keys: Tensor | None) -> bool:
    """Whether the attention kernel reads keys and values of this kind."""
    return keys is not None and keys.dim() == 4 and keys.dtype in (torch.float32, torch.bfloat16)


class LinearMode(TorchFunctionMode):
    """Within it, eager `F.linear` products on the CPU, with no gradient being recorded, go to
    `product` where `takes` accepts their rows and weight; the others stay as they are."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_arguments(*args, **kwargs)
            rows = _eager_cpu_rows(x, weight, bias)
            if rows is not None and self.takes(rows, x, weight):
                return self.product(x, weight, bias)
        return func(*args, **kwargs)

    def takes(self, rows: int, x: Tensor, weight: Tensor) -> bool:
        raise NotImplementedError

    def product(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError


class KernelProducts(LinearMode):
    """Within it, eager `F.linear` products of at most `max_rows` rows on the CPU go through the
    kernel, where it reads the weight and no gradient is being recorded (the kernel has none).
    The kernel is loaded (built on first use); where it cannot be, the products stay as they
    are."""

    def __init__(self, max_rows: int):
        super().__init__()
        self.max_rows = max_rows
        self.loaded = load() is None

    def takes(self, rows: int, x: Tensor, weight: Tensor) -> bool:
        return self.loaded and x.is_floating_point() and rows <= self.max_rows and reads(weight)

    def product(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return kernel_linear(x, weight, bias)


def _linear_arguments(input: object = None, weight: object = None, bias: object = None
                      ) -> tuple[object, object, object]:
    """`F.linear`'s arguments, however they were passed."""
    return input, weight, bias


def _eager_cpu_rows(x: object, weight: object, bias: object) -> int | None:
    """The rows of an `F.linear` product whose tensors are all on the CPU, with a matrix weight
    that fits x and no gradient being recorded through it; None for any other."""
    tensors = [tensor for tensor in (x, weight, bias) if isinstance(tensor, Tensor)]
    if not (
        isinstance(x, Tensor) and isinstance(weight, Tensor) and x.dim() >= 2
        and weight.dim() == 2 and weight.shape[1] == x.shape[-1]
        and all(tensor.device.type == "cpu" for tensor in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    ):
        return None
    return math.prod(x.shape[:-1])
