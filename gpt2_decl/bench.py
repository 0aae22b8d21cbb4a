"""Benchmarks: timing, matmul and copy rooflines, and compiled vs eager forward passes.

Every figure is measured in the calling process, so the rooflines and the model timings see the
same threads, clocks and neighbours.
"""

import datetime
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from gpt2_decl.compiling import compile as compile_model
from gpt2_decl.config import GPT2Config
from gpt2_decl.huge_pages import empty as empty_in_huge_pages
from gpt2_decl.model import GPT2
from gpt2_decl.summary import count_parameters
from gpt2_decl.typecheck import is_typechecked, typechecked

# A matmul this size keeps every core busy with little edge waste: it measures the sustained peak.
ROOFLINE_MATMUL_SIZE = 2048
# Large enough to spill the last-level cache of any current CPU, so the copy runs from memory.
COPY_BANDWIDTH_BYTES = 256 * 2**20
# A copy reads each byte once and writes it once.
BYTES_MOVED_PER_BYTE_COPIED = 2
# A multiply-add is 2 FLOPs: each parameter costs one per token, a size^3 matmul size^3.
FLOPS_PER_MULTIPLY_ADD = 2
# Attention's scores and weighted sum, 2 * T * d_model FLOPs each per layer and token.
ATTENTION_FLOPS = 4
# The fastest correct settings measured on CPU: weights frozen into the graph as constants, which
# lets inductor pre-pack them for MKL (fp32) and oneDNN (bf16). max-autotune benchmarks its own
# C++ GEMMs against those, picks the same pre-packed kernels here, and compiles 2-5x slower.
DEFAULT_COMPILE_MODE = "default"
DEFAULT_FREEZE = True


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of repeated runs, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    runs: int


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer around it measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_call(fn: Callable[[], object], device: torch.device, *, runs: int, warmup: int) -> Timing:
    """Time `fn()`: `warmup` untimed calls, then `runs` timed ones, each synchronised."""
    return time_interleaved({"fn": fn}, device, runs=runs, warmup=warmup)["fn"]


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, *, runs: int, warmup: int
) -> dict[str, Timing]:
    """Time several functions in turn, run by run, so a change in the machine's load (other
    processes, clocks) falls on all of them alike rather than on whichever ran last."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs} warmup={warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times_ms: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times_ms[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: Timing(statistics.median(times), min(times), max(times), runs)
        for name, times in times_ms.items()
    }


@dataclass(frozen=True)
class RooflineMatmul:
    """A square matmul whose achieved FLOP/s is the ceiling a model's matmuls face."""

    a: Tensor
    b: Tensor

    @classmethod
    def build(
        cls, device: torch.device, dtype: torch.dtype, size: int = ROOFLINE_MATMUL_SIZE
    ) -> "RooflineMatmul":
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
        return cls(a, b)

    def __call__(self) -> Tensor:
        return self.a @ self.b

    def flops_per_s(self, timing: Timing) -> float:
        return FLOPS_PER_MULTIPLY_ADD * self.a.shape[0] ** 3 / (timing.median_ms / 1e3)


def measure_matmul_roofline(
    device: torch.device,
    dtype: torch.dtype,
    *,
    size: int = ROOFLINE_MATMUL_SIZE,
    runs: int = 5,
    warmup: int = 2,
) -> float:
    """Achieved FLOP/s of a `size` x `size` matmul in `dtype` (median run, as for models)."""
    matmul = RooflineMatmul.build(device, dtype, size)
    with torch.no_grad():
        return matmul.flops_per_s(time_call(matmul, device, runs=runs, warmup=warmup))


def copy_buffers(
    n_bytes: int, device: torch.device, *, huge_pages: bool = False
) -> tuple[Tensor, Tensor]:
    """A source of `n_bytes` filled with ones and a target of the same size, for timing copies;
    huge_pages: CPU tensors in transparent huge pages (see `huge_pages.available`)."""
    if huge_pages:
        if device.type != "cpu":
            raise ValueError(f"huge pages are CPU memory; cannot measure them on {device}")
        source, target = (empty_in_huge_pages(n_bytes) for _ in range(2))
        source.fill_(1)
    else:
        source = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
        target = torch.empty_like(source)
    return source, target


def measure_copy_bandwidth(
    device: torch.device,
    *,
    n_bytes: int = COPY_BANDWIDTH_BYTES,
    runs: int = 5,
    warmup: int = 2,
    huge_pages: bool = False,
) -> float:
    """Memory bandwidth in bytes/s of copying an `n_bytes` tensor (read + write both counted).

    The ceiling of anything that streams its data once, such as batch-1 decoding, which reads
    every weight per token. huge_pages: copy between CPU tensors in transparent huge pages (see
    `huge_pages.available`), where compiled CPU decoding keeps its weights.
    """
    source, target = copy_buffers(n_bytes, device, huge_pages=huge_pages)
    timing = time_call(lambda: target.copy_(source), device, runs=runs, warmup=warmup)
    return BYTES_MOVED_PER_BYTE_COPIED * n_bytes / (timing.median_ms / 1e3)


def forward_flops_per_token(config: GPT2Config, seq: int) -> int:
    """2N + 4 n_layer T d_model: N counts parameters without the position embedding, tied once."""
    n = count_parameters(config).without_position_embedding
    return FLOPS_PER_MULTIPLY_ADD * n + ATTENTION_FLOPS * config.n_layer * seq * config.d_model


def forward_flops(config: GPT2Config, batch: int, seq: int) -> int:
    """FLOPs of one forward pass over `batch` sequences of `seq` tokens."""
    return batch * seq * forward_flops_per_token(config, seq)


def device_name(device: torch.device) -> str:
    """What the device is, in words: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Where and when a benchmark ran: enough to compare figures across machines and days."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu": device_name(torch.device("cpu")),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


@dataclass(frozen=True)
class ForwardRow:
    """Eager and compiled forward passes at one sequence length."""

    batch: int
    seq: int
    flops: int
    eager: Timing
    compiled: Timing
    compile_s: float
    max_abs_diff: float
    roofline_flops_per_s: float
    typechecked: Timing | None = None

    @property
    def speedup(self) -> float:
        return self.eager.median_ms / self.compiled.median_ms

    def tokens_per_s(self, timing: Timing) -> float:
        return self.batch * self.seq / (timing.median_ms / 1e3)

    def flops_per_s(self, timing: Timing) -> float:
        return self.flops / (timing.median_ms / 1e3)

    def roofline_fraction(self, timing: Timing) -> float:
        return self.flops_per_s(timing) / self.roofline_flops_per_s

    @property
    def typecheck_overhead(self) -> float | None:
        """Extra eager time with typechecked mode on, as a fraction of eager time with it off."""
        if self.typechecked is None:
            return None
        return self.typechecked.median_ms / self.eager.median_ms - 1.0

    def to_dict(self) -> dict:
        """Flat figures for JSON: compiled figures unprefixed, eager ones prefixed `eager_`."""

        def spread(name: str, timing: Timing | None) -> dict:
            if timing is None:
                return {}
            return {
                f"{name}_ms": timing.median_ms,
                f"{name}_min_ms": timing.min_ms,
                f"{name}_max_ms": timing.max_ms,
            }

        return {
            "batch": self.batch,
            "seq": self.seq,
            "flops": self.flops,
            "roofline_flops_per_s": self.roofline_flops_per_s,
            "runs": self.compiled.runs,
            **spread("eager", self.eager),
            **spread("compiled", self.compiled),
            "compile_s": self.compile_s,
            "speedup": self.speedup,
            "max_abs_diff": self.max_abs_diff,
            "tokens_per_s": self.tokens_per_s(self.compiled),
            "eager_tokens_per_s": self.tokens_per_s(self.eager),
            "flops_per_s": self.flops_per_s(self.compiled),
            "eager_flops_per_s": self.flops_per_s(self.eager),
            "roofline_fraction": self.roofline_fraction(self.compiled),
            "eager_roofline_fraction": self.roofline_fraction(self.eager),
            **spread("typechecked_eager", self.typechecked),
            "typecheck_overhead": self.typecheck_overhead,
        }


@dataclass(frozen=True)
class CompileSettings:
    """How the benchmark compiles: `gpt2_decl.compile`'s mode and weight freezing."""

    mode: str = DEFAULT_COMPILE_MODE
    freeze: bool = DEFAULT_FREEZE


def random_tokens(
    config: GPT2Config, batch: int, seq: int, device: torch.device, seed: int
) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(config.vocab_size, (batch, seq), generator=generator).to(device)


def benchmark_forward(
    model: GPT2,
    seqs: Sequence[int],
    *,
    batch: int = 1,
    runs: int = 5,
    warmup: int = 1,
    compile_settings: CompileSettings = CompileSettings(),
    typecheck_overhead: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Iterator[ForwardRow]:
    """Time eager and compiled forward passes of `model` at each sequence length, one row each.

    Eager, compiled and the roofline matmul (in the model's dtype) are timed in turn, run by run,
    so each row's speedup and roofline fraction compare runs that saw the same load. Timings use
    the current typechecked mode; with `typecheck_overhead` (and the mode off), eager in
    typechecked mode joins the rotation. Each row compiles afresh (Dynamo's caches reset), so its
    compile time is a first compile's. Inputs, compile and timing all run under
    `torch.no_grad()`: Dynamo guards on the grad mode, and weight freezing is for inference only.
    """
    config, device = model.config, model.device
    matmul = RooflineMatmul.build(device, model.dtype)
    model.eval()
    for seq in seqs:
        with torch.no_grad():
            tokens = random_tokens(config, batch, seq, device, seed)
            torch._dynamo.reset()
            mode, freeze = compile_settings.mode, compile_settings.freeze
            compiled = compile_model(model, mode=mode, freeze=freeze)
            log(f"compiling (seq={seq}, mode={mode}, freeze={freeze})...")
            start = time.perf_counter()
            compiled_logits = compiled(tokens)
            synchronize(device)
            compile_s = time.perf_counter() - start
            difference = (compiled_logits.float() - model(tokens).float()).abs().max().item()
            del compiled_logits

            fns = {"eager": partial(model, tokens), "compiled": partial(compiled, tokens)}
            if typecheck_overhead and not is_typechecked():
                fns["typechecked"] = partial(_typechecked_call, model, tokens)
            fns["roofline"] = matmul
            log(f"seq {seq}: timing {', '.join(fns)} in turn ({warmup} warm-up, {runs} runs)...")
            timings = time_interleaved(fns, device, runs=runs, warmup=warmup)
        yield ForwardRow(
            batch=batch,
            seq=seq,
            flops=forward_flops(config, batch, seq),
            eager=timings["eager"],
            compiled=timings["compiled"],
            compile_s=compile_s,
            max_abs_diff=difference,
            roofline_flops_per_s=matmul.flops_per_s(timings["roofline"]),
            typechecked=timings.get("typechecked"),
        )


def _typechecked_call(model: GPT2, tokens: Tensor) -> Tensor:
    with typechecked():
        return model(tokens)
