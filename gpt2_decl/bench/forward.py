"""Eager against compiled forward passes, each sequence length in one row, with the matmul
roofline, typechecked mode's cost and, when asked, the model compiled with a speed-up plan and
transformers' compiled model on the same weights, all timed in turns."""

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from gpt2_decl.bench.measure import random_tokens
from gpt2_decl.core.compiling import compile as compile_model
from gpt2_decl.core.counting import forward_flops
from gpt2_decl.core.devices import (
    ROOFLINE_MATMUL_SIZE,
    ROOFLINE_PRODUCTS,
    roofline_products,
    synchronize,
)
from gpt2_decl.core.model import GPT2
from gpt2_decl.core.shapes import check_shapes
from gpt2_decl.core.timing import Timing, time_in_turns
from gpt2_decl.core.typecheck import is_typechecked, typechecked
from gpt2_decl.speedups.plan import Plan


@dataclass(frozen=True)
class ForwardRow:
    """One sequence length: the timings of "eager", "compiled", "roofline" (the matmul) and,
    when measured, "tuned" (compiled with a plan), "typechecked_eager", "typechecked_compiled"
    and "transformers_compiled"."""

    batch: int
    seq: int
    flops: int
    timings: dict[str, Timing]
    compile_s: float
    max_abs_diff: float
    shape_check_s: float | None = None  # what a typechecked compiled call adds for a new shape
    transformers_diff: float | None = None  # max |logits - transformers' compiled logits|
    plan: Plan | None = None

    @property
    def roofline_flops_per_s(self) -> float:
        return (2 * ROOFLINE_MATMUL_SIZE**3 * ROOFLINE_PRODUCTS
                / (self.timings["roofline"].median_ms / 1e3))

    def tokens_per_s(self, name: str) -> float:
        return self.batch * self.seq / (self.timings[name].median_ms / 1e3)

    def to_dict(self) -> dict:
        """Flat figures for JSON: the compiled model's unprefixed, the others prefixed."""
        ms = {name: timing.median_ms for name, timing in self.timings.items()}
        row = {"batch": self.batch, "seq": self.seq, "flops": self.flops,
               "runs": len(self.timings["compiled"].times_ms), "compile_s": self.compile_s,
               "max_abs_diff": self.max_abs_diff, "shape_check_s": self.shape_check_s,
               "max_abs_diff_vs_transformers": self.transformers_diff,
               "plan": None if self.plan is None else self.plan.to_dict(),
               "roofline_flops_per_s": self.roofline_flops_per_s,
               "speedup": ms["eager"] / ms["compiled"]}
        for name, timing in self.timings.items():
            row |= {f"{name}_ms": timing.median_ms, f"{name}_min_ms": timing.min_ms,
                    f"{name}_max_ms": timing.max_ms}
        for prefix, name in (("", "compiled"), ("eager_", "eager")):
            row[f"{prefix}tokens_per_s"] = self.tokens_per_s(name)
            flops_per_s = row[f"{prefix}flops_per_s"] = self.flops / (ms[name] / 1e3)
            row[f"{prefix}roofline_fraction"] = flops_per_s / self.roofline_flops_per_s
        for prefix, name in (("", "eager"), ("compiled_", "compiled")):
            checked = ms.get(f"typechecked_{name}")
            row[f"{prefix}typecheck_overhead"] = checked / ms[name] - 1 if checked else None
        reference, tuned = ms.get("transformers_compiled"), ms.get("tuned")
        row["over_transformers"] = reference / ms["compiled"] if reference else None
        row["tuned_over_transformers"] = reference / tuned if reference and tuned else None
        row["tuned_over_compiled"] = ms["compiled"] / tuned if tuned else None
        return row


def benchmark_forward(
    model: GPT2,
    seqs: Sequence[int],
    *,
    batch: int = 1,
    runs: int = 5,
    warmup: int = 1,
    mode: str = "default",
    freeze: bool = False,
    tune: Callable[[int], Plan] | None = None,
    typecheck_overhead: bool = True,
    reference: nn.Module | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Iterator[ForwardRow]:
    """One row per sequence length. Each row compiles afresh (Dynamo's caches reset), so its
    compile time is a first compile's; then eager, compiled (plain, or frozen), compiled with
    the plan `tune(seq)` gives (where given), both plain ones in typechecked mode, `reference`
    compiled (transformers' model, frozen as the plan freezes) and a square matmul take turns
    run by run. All under `torch.no_grad()`: Dynamo guards on the grad mode, and weight
    freezing is for inference only."""
    device, dtype = model.device, model.dtype
    generator = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(ROOFLINE_MATMUL_SIZE, ROOFLINE_MATMUL_SIZE, generator=generator)
            .to(device, dtype) for _ in range(2))
    product = torch.empty_like(a)
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
            plan = None
            if tune is not None:
                plan = tune(seq)
                log(plan.describe())
                tuned = compile_model(model, plan=plan)
                tuned(tokens)  # compiled before the turns
                fns["tuned"] = partial(tuned, tokens)
            check_s = None
            if typecheck_overhead and not is_typechecked():
                fns["typechecked_eager"] = partial(_typechecked_call, model, tokens)
                fns["typechecked_compiled"] = partial(_typechecked_call, compiled, tokens)
                start = time.perf_counter()  # what its first call adds: every layer's check
                check_shapes(model, batch, seq)
                check_s = time.perf_counter() - start
            reference_diff = None
            if reference is not None:
                fns["transformers_compiled"] = partial(_reference_call, torch.compile(reference),
                                                       tokens, freeze or tune is not None)
                reference_logits = fns["transformers_compiled"]()
                reference_diff = (reference_logits.float() - model(tokens).float()).abs().max()
                reference_diff = reference_diff.item()
                del reference_logits
            fns["roofline"] = partial(roofline_products, a, b, product)
            log(f"seq {seq}: timing {', '.join(fns)} in turn ({warmup} warm-up, {runs} runs)...")
            timings = time_in_turns(fns, device, runs=runs, warmup=warmup)
        yield ForwardRow(batch, seq, forward_flops(model.config, batch, seq), timings,
                         compile_s, difference, check_s, reference_diff, plan)


def _reference_call(compiled: Callable, tokens: torch.Tensor, freeze: bool) -> torch.Tensor:
    with torch._inductor.config.patch(freezing=freeze):
        return compiled(tokens).logits


def _typechecked_call(model: Callable, tokens: torch.Tensor) -> torch.Tensor:
    with typechecked():
        return model(tokens)


def format_table(rows: Sequence[ForwardRow]) -> str:
    header = (f"{'seq':>6} {'eager ms [min-max]':>24} {'compiled ms [min-max]':>24} "
              f"{'compile s':>9} {'speedup':>7} {'tokens/s':>10} {'roofline':>8} "
              f"{'max|diff|':>9} {'typecheck':>9} {'compiled':>8}")
    tuned = any("tuned" in row.timings for row in rows)
    references = any(row.transformers_diff is not None for row in rows)
    header += f" {'tuned ms [min-max]':>24} {'over plain':>10}" if tuned else ""
    header += f" {'transformers compiled ms':>24} {'over tf':>7}" if references else ""
    lines = [header, "-" * len(header)]
    for row in rows:
        figures = row.to_dict()
        overhead, compiled = figures["typecheck_overhead"], figures["compiled_typecheck_overhead"]
        lines.append(
            f"{row.seq:>6} {row.timings['eager'].spread():>24} "
            f"{row.timings['compiled'].spread():>24} "
            f"{row.compile_s:>9.1f} {figures['speedup']:>6.2f}x {figures['tokens_per_s']:>10,.0f} "
            f"{figures['roofline_fraction']:>8.0%} {row.max_abs_diff:>9.1e} "
            f"{_percent(overhead):>9} {_percent(compiled):>8}")
        if tuned:
            timing = row.timings.get("tuned")
            lines[-1] += (f" {timing.spread() if timing else '-':>24} "
                          f"{_times(figures['tuned_over_compiled']):>10}")
        if references:
            timing = row.timings.get("transformers_compiled")
            over = figures["tuned_over_transformers" if tuned else "over_transformers"]
            lines[-1] += f" {timing.spread() if timing else '-':>24} {_times(over):>7}"
    lines.append("tokens/s and roofline (FLOP/s over a square matmul's, timed in turn) are the "
                 "compiled model's; typecheck: extra time in typechecked mode, eager and compiled"
                 + ("; over plain: the plain compiled time over the tuned one" if tuned else "")
                 + (f"; over tf: transformers' compiled time over {'tuned' if tuned else 'ours'}"
                    if references else "") + ".")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
