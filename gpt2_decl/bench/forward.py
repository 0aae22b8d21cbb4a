"""Eager against compiled forward passes, each sequence length in one row, with the matmul
roofline and typechecked mode's cost timed in turn with them."""

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from gpt2_decl.bench.measure import Timing, random_tokens, time_interleaved
from gpt2_decl.core.compiling import compile as compile_model
from gpt2_decl.core.counting import forward_flops
from gpt2_decl.core.devices import ROOFLINE_MATMUL_SIZE, synchronize
from gpt2_decl.core.model import GPT2
from gpt2_decl.core.typecheck import is_typechecked, typechecked


@dataclass(frozen=True)
class ForwardRow:
    batch: int
    seq: int
    flops: int
    eager: Timing
    compiled: Timing
    compile_s: float
    max_abs_diff: float
    roofline_flops_per_s: float
    typechecked: Timing | None = None

    def tokens_per_s(self, timing: Timing) -> float:
        return self.batch * self.seq / (timing.median_ms / 1e3)

    def roofline_fraction(self, timing: Timing) -> float:
        return self.flops / (timing.median_ms / 1e3) / self.roofline_flops_per_s

    def to_dict(self) -> dict:
        """Flat figures for JSON: compiled ones unprefixed, the others prefixed."""
        row = {"batch": self.batch, "seq": self.seq, "flops": self.flops, "runs":
               len(self.compiled.times_ms), "roofline_flops_per_s": self.roofline_flops_per_s}
        for name, timing in (("eager", self.eager), ("compiled", self.compiled),
                             ("typechecked_eager", self.typechecked)):
            if timing is not None:
                row |= {f"{name}_ms": timing.median_ms, f"{name}_min_ms": timing.min_ms,
                        f"{name}_max_ms": timing.max_ms}
        overhead = None if self.typechecked is None else (
            self.typechecked.median_ms / self.eager.median_ms - 1.0)
        return row | {
            "compile_s": self.compile_s,
            "speedup": self.eager.median_ms / self.compiled.median_ms,
            "max_abs_diff": self.max_abs_diff,
            "tokens_per_s": self.tokens_per_s(self.compiled),
            "eager_tokens_per_s": self.tokens_per_s(self.eager),
            "flops_per_s": self.flops / (self.compiled.median_ms / 1e3),
            "roofline_fraction": self.roofline_fraction(self.compiled),
            "eager_roofline_fraction": self.roofline_fraction(self.eager),
            "typecheck_overhead": overhead,
        }


def benchmark_forward(
    model: GPT2,
    seqs: Sequence[int],
    *,
    batch: int = 1,
    runs: int = 5,
    warmup: int = 1,
    mode: str = "default",
    freeze: bool = True,
    typecheck_overhead: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Iterator[ForwardRow]:
    """One row per sequence length. Each row compiles afresh (Dynamo's caches reset), so its
    compile time is a first compile's; then eager, compiled, eager in typechecked mode and a
    square matmul take turns run by run. All under `torch.no_grad()`: Dynamo guards on the
    grad mode, and weight freezing is for inference only."""
    device, dtype = model.device, model.dtype
    generator = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(ROOFLINE_MATMUL_SIZE, ROOFLINE_MATMUL_SIZE, generator=generator)
            .to(device, dtype) for _ in range(2))
    model.eval()
    for seq in seqs:
        with torch.no_grad():
            tokens = random_tokens(model.config.vocab_size, batch, seq, device, seed)
            torch._dynamo.reset()
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
            fns["roofline"] = partial(torch.matmul, a, b)
            log(f"seq {seq}: timing {', '.join(fns)} in turn ({warmup} warm-up, {runs} runs)...")
            timings = time_interleaved(fns, device, runs=runs, warmup=warmup)
        yield ForwardRow(
            batch=batch, seq=seq, flops=forward_flops(model.config, batch, seq),
            eager=timings["eager"], compiled=timings["compiled"], compile_s=compile_s,
            max_abs_diff=difference,
            roofline_flops_per_s=2 * ROOFLINE_MATMUL_SIZE**3
            / (timings["roofline"].median_ms / 1e3),
            typechecked=timings.get("typechecked"),
        )


def _typechecked_call(model: GPT2, tokens: torch.Tensor) -> torch.Tensor:
    with typechecked():
        return model(tokens)


def format_table(rows: Sequence[ForwardRow]) -> str:
    header = (f"{'seq':>6} {'eager ms [min-max]':>24} {'compiled ms [min-max]':>24} "
              f"{'compile s':>9} {'speedup':>7} {'tokens/s':>10} {'roofline':>8} "
              f"{'max|diff|':>9} {'typecheck':>9}")
    lines = [header, "-" * len(header)]
    for row in rows:
        figures = row.to_dict()
        overhead = figures["typecheck_overhead"]
        lines.append(
            f"{row.seq:>6} {row.eager.spread():>24} {row.compiled.spread():>24} "
            f"{row.compile_s:>9.1f} {figures['speedup']:>6.2f}x {figures['tokens_per_s']:>10,.0f} "
            f"{figures['roofline_fraction']:>8.0%} {row.max_abs_diff:>9.1e} "
            f"{'-' if overhead is None else f'{overhead:+.1%}':>9}"
        )
    lines.append("tokens/s and roofline (FLOP/s over a square matmul's, timed in turn) are the "
                 "compiled model's; typecheck is eager's extra time with typechecked mode on.")
    return "\n".join(lines)
