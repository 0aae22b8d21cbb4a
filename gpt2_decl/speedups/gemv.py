"""A C++ GEMV kernel for decoding on a CPU: the products of one or a few rows with a weight
matrix, which a decoding step makes once per weight per token (kernels/gemv.cpp).

Such a product reads the whole weight for a few multiply-adds per element, so it is bound by
how fast the weight streams from memory. The kernel reads the weight in blocks of rows,
prefetching the next block, and multiplies each block by every input row while it is in cache;
bfloat16 and int8 weights are upcast to float32 in registers, sums are float32. int8 weights
meet the input rows as integers where the CPU allows: each row split into two int8 digits with
AVX512-VNNI, rounded to int16 with AVX2 (exact integer dot products, each element of a row off
by at most 1/65,000 of its largest). More than four rows (a prompt's tokens) make a GEMM, done
as outer products over panels of the transposed rows. On the machines measured it wins for
weight-only int8 weights, which torchao's own product dequantizes in full at every call, and
for bfloat16 ones (docs/cpu-speedups.md): in a decoding step (`decoding.DecodeStep`), and in a
prompt's eager pass (`GemvLinear`), whose blocks' products have a row per token and whose
output head has one per prompt.

It is built for this machine (`-march=native`) with the C++ compiler at hand (`$CXX`, else
c++, g++ or clang++) and ninja, on first explicit use (`load`: a plan that times it), and kept
in `$XDG_CACHE_HOME/gpt2_decl` (default ~/.cache/gpt2_decl) for later processes. Its rows are
spread over torch's OpenMP threads; a compiler without OpenMP (clang with no omp.h) builds it
for one thread, and `load` says so.
"""

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from gpt2_decl.speedups.quantize import int8_rows
from gpt2_decl.speedups.rewrites import LinearMode

SOURCE = Path(__file__).parent / "kernels" / "gemv.cpp"
# -ffp-contract=fast: multiply-adds fused, as GNU modes do by default and -std=c++17 does not.
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast"]
# With it, at::parallel_for spreads the rows over torch's OpenMP threads; without, one thread.
OPENMP = "-fopenmp"
ARCHITECTURES = ("x86_64", "AMD64")
COMPILERS = ("c++", "g++", "clang++")
# Weights the kernel reads as they are (int8 weights come as torchao's rows and scales).
FLOAT_WEIGHTS = (torch.float32, torch.bfloat16)


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded on this machine; the message says why, in a line."""


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2_decl"


def compiler() -> str | None:
    """The C++ compiler the kernel is built with: `$CXX`, else the first of COMPILERS found."""
    named = os.environ.get("CXX")
    if named:
        return shutil.which(named)
    return next((found for name in COMPILERS if (found := shutil.which(name))), None)


def unavailable_reason() -> str | None:
    """Why the kernel cannot be built here, found without building (None: it can be tried)."""
    if platform.machine() not in ARCHITECTURES:
        return f"the GEMV kernel is written for x86-64; this machine is {platform.machine()}"
    if compiler() is None:
        named = os.environ.get("CXX")
        return (f"no C++ compiler: $CXX={named!r} is not found" if named else
                "no C++ compiler found (c++, g++ or clang++; or set $CXX)")
    return None


@functools.cache
def load() -> str:
    """Build the kernel (once per machine, compiler and source) and load it; say how it was
    built, in a line. KernelUnavailable, in one line, where that cannot be done."""
    reason = unavailable_reason()
    if reason is not None:
        raise KernelUnavailable(reason)
    cxx = compiler()
    flags = FLAGS + ([OPENMP] if _has_openmp(cxx) else [])
    machine = [platform.machine(), _cpu_flags(), torch.__version__, cxx]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags + machine).encode()).hexdigest()
    library = cache_folder() / f"gemv-{key[:16]}.so"
    try:
        if not library.exists():
            _build_once(library, lambda: _build(library, cxx, flags))
        torch.ops.load_library(str(library))
    except Exception as error:
        lines = str(error).strip().splitlines()
        raise KernelUnavailable(f"the GEMV kernel did not build with {cxx} "
                                f"({type(error).__name__}: {lines[-1] if lines else ''})") from None
    _register_fakes()
    threads = "OpenMP threads" if OPENMP in flags else "one thread (the compiler has no OpenMP)"
    int8 = {"digits": "int8 rows as VNNI dot products of int8 digits",
            "int16": "int8 rows times int16 rows (AVX2), upcast for prompts",
            "widened": "int8 rows upcast to float32"}[torch.ops.gpt2_decl.int8_gemv_way()]
    return f"built with {cxx} for this CPU, on {threads}; {int8}"


def _has_openmp(cxx: str) -> bool:
    """Whether `cxx` compiles OpenMP code: it takes -fopenmp and finds omp.h."""
    probe = subprocess.run([cxx, OPENMP, "-x", "c++", "-fsyntax-only", "-"],
                           input="#include <omp.h>\n", capture_output=True, text=True)
    return probe.returncode == 0


def _cpu_flags() -> str:
    """What -march=native compiles for: the CPU's flags (Linux), else torch's summary."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line for line in cpuinfo if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return torch.backends.cpu.get_cpu_capability()


def _build_once(library: Path, build: Callable[[], None]) -> None:
    """`build()` unless `library` exists, one process at a time: processes that start together
    (test workers, `torchrun`'s) wait for the first to build it, then find it built."""
    import fcntl  # POSIX, as the kernel's x86-64 Linux and macOS are

    library.parent.mkdir(parents=True, exist_ok=True)
    with open(library.parent / f"{library.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not library.exists():
            build()


def _build(library: Path, cxx: str, flags: list[str]) -> None:
    """Compile into a folder of this process's own, then move the library into place in one
    step: a build killed midway, or two at once, never leaves a partial file where it is read."""
    from torch.utils.cpp_extension import load as build_extension

    library.parent.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="gemv-", dir=library.parent)
    before = os.environ.get("CXX")
    os.environ["CXX"] = cxx  # the compiler torch's extension builder runs
    try:
        build_extension("gpt2_decl_gemv", [str(SOURCE)], extra_cflags=flags,
                        extra_ldflags=[OPENMP] if OPENMP in flags else [],
                        build_directory=folder,
                        is_python_module=False, verbose=False)
        os.replace(Path(folder) / "gpt2_decl_gemv.so", library)
    finally:
        if before is None:
            os.environ.pop("CXX", None)
        else:
            os.environ["CXX"] = before
        shutil.rmtree(folder, ignore_errors=True)


@functools.cache
def _register_fakes() -> None:
    """What the kernel's ops return, for torch.compile's tracing: float32 [rows, out]."""

    @torch.library.register_fake("gpt2_decl::gemv")
    def _(x: Tensor, weight: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)

    @torch.library.register_fake("gpt2_decl::int8_gemv")
    def _(x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], qdata.shape[0], dtype=torch.float32)


def reads(weight: Tensor) -> bool:
    """Whether the kernel takes this weight: float32, bfloat16, or torchao's weight-only int8."""
    return weight.dim() == 2 and (int8_rows(weight) is not None or weight.dtype in FLOAT_WEIGHTS)


def gemv_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` of a few rows through the kernel (float32 sums, returned in x's dtype)."""
    rows = x.reshape(-1, x.shape[-1])
    int8 = int8_rows(weight)
    if int8 is None:
        product = torch.ops.gpt2_decl.gemv(rows, weight.contiguous())
    else:
        qdata, scale, zero_point = int8
        product = torch.ops.gpt2_decl.int8_gemv(rows, qdata.contiguous(), scale.flatten(),
                                                zero_point.flatten())
    product = product.to(x.dtype).reshape(*x.shape[:-1], -1)
    return product if bias is None else product + bias


class GemvLinear(LinearMode):
    """Within it, eager CPU products (no gradient recorded) of weights the kernel reads go
    through it: a prompt's, before decoding. Load the kernel (`load`) first."""

    def replacement(self, x: Tensor, weight: Tensor) -> Callable | None:
        return gemv_linear if x.dtype in FLOAT_WEIGHTS and reads(weight) else None
