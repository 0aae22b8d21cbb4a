"""Greedy decoding speed, batch 1, against the memory bound: a step reads every weight once,
so tokens/s <= read bandwidth / bytes of weights. The ways of decoding take turns run by run,
and the read bandwidth is measured right after every run, so each run meets the bound of its
own moment (a shared machine's bandwidth drifts from minute to minute). Each turn also times
the prompt and first token alone, so that the tokens after it are reported on their own too,
as llama.cpp's bench reports prompt processing apart from generation: a batch's prompt is a
batch of prompts, and runs at the speed of arithmetic, not of reading weights."""

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gpt2_decl.bench.engines import LLAMA_FILES, llama_cpp_decoders, transformers_generate
from gpt2_decl.bench.measure import ReadBandwidth
from gpt2_decl.core.config import GPT2Config
from gpt2_decl.core.model import GPT2
from gpt2_decl.core.tensors import stored_bytes
from gpt2_decl.core.timing import Timing, time_in_turns
from gpt2_decl.speedups.plan import Plan
from gpt2_decl.speedups.quantize import Agreement, agreement
from gpt2_decl.text.generation import generate
from gpt2_decl.training.data import evaluation_batches, load_corpus
from gpt2_decl.training.evaluation import check_fits

# Warm-up generations are this short: enough to compile every graph a full run uses.
WARMUP_TOKENS = 2


@dataclass(frozen=True)
class Way:
    """A way of decoding: decode(prompt, new_tokens) -> tokens, with what it reads per token."""

    name: str
    decode: Callable[[Tensor, int], Tensor]
    weight_bytes: int
    dtype: torch.dtype
    rows: int = 1  # prompts decoded at once: one read of the weights serves them all


def weight_bytes_per_token(model: GPT2) -> int:
    """What a decode step reads: every parameter once (an int8 one as int8), but of an
    embedding table only a row, unless the table is also the output head."""
    tables = {id(model.position_embedding.weight), id(model.token_embedding.weight)}
    skip = tables - {id(model.lm_head.weight)}
    return sum(stored_bytes(p) for p in model.parameters() if id(p) not in skip)


def ways_of_decoding(model: GPT2, *, suffix: str = "", reference: bool = True,
                     batches: Sequence[int] = (1,), eager: bool = True,
                     plans: dict[int, Plan] | None = None) -> list[Way]:
    """Ours eager (unless not `eager`), compiled plain for each of `batches` copies of the prompt
    at once, and compiled with the plan for that batch where `plans` has one; transformers'
    `generate` (where `reference`)."""
    n_bytes = weight_bytes_per_token(model)

    def ours(name: str, rows: int, **options) -> Way:
        def decode(prompt: Tensor, new: int) -> Tensor:
            return generate(model, prompt.repeat(rows, 1), new, greedy=True, **options)

        batch = f", batch {rows}" if rows > 1 else ""
        return Way(name + batch + suffix, decode, n_bytes, model.dtype, rows)

    ways = [ours("eager, cache", 1)] if eager else []
    for rows in batches:
        ways.append(ours("compiled, cache", rows, compile=True))
        if plans and rows in plans:
            ways.append(ours("compiled, cache, tuned", rows, plan=plans[rows]))
    if reference and (decode := transformers_generate(model)) is not None:
        ways.append(Way("transformers generate", decode, n_bytes, model.dtype))
    return ways


def llama_cpp_ways(model: GPT2, directory: str, q8_0: bool = False, prompt_tokens: int = 32
                   ) -> list[Way]:
    """llama.cpp's greedy decoding of the same weights as GGUF files (`engines`), with the
    bytes each reads per token; Q8_0's tokens are compared with float32's, as our int8's are."""
    float32_bytes = weight_bytes_per_token(model) * 4 // model.dtype.itemsize
    return [Way(f"llama.cpp {name}", decode, int(float32_bytes * LLAMA_FILES[name] / 4),
                torch.bfloat16 if name == "BF16" else torch.float32)
            for name, decode in llama_cpp_decoders(model, directory, q8_0,
                                                   prompt_tokens).items()]


def quality_tokens(data: Path, config: GPT2Config) -> np.ndarray:
    """The tokens of the text at `data` (tokenized once, then cached), at least a window."""
    tokens = load_corpus(data, None, None, called="--quality-data").tokens
    try:
        check_fits(tokens, config)
    except ValueError as error:
        raise ValueError(f"--quality-data {str(data)!r}: {error}") from None
    return tokens


def quantization_quality(model: GPT2, quantized: GPT2, tokens: np.ndarray, n_tokens: int = 8192
                         ) -> Agreement:
    """The quantized model's next-token top-1 agreement with `model` and both losses, over the
    first context windows (about `n_tokens` tokens) of `tokens`."""
    windows = max(1, n_tokens // model.config.n_ctx)
    batches = evaluation_batches(tokens, model.config.n_ctx, 4, model.device, windows, 0, 1)
    return agreement(model, quantized, batches)


def after_first_rates(rows: int, new_tokens: int, times_ms: list[float],
                      first_token_ms: list[float]) -> list[float | None]:
    """Tokens/s after the first, run by run: the tokens of every row but the first of each,
    over a whole run's time less the prompt and first token's of the same turn (None where
    there are no such tokens, or where timing noise leaves no time for them)."""
    return [rows * (new_tokens - 1) / ((whole - first) / 1e3)
            if new_tokens > 1 and whole > first else None
            for whole, first in zip(times_ms, first_token_ms, strict=True)]


def median_or_none(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def row(way: Way, times_ms: list[float], new_tokens: int, read_bandwidths: list[float],
        warmup_s: float, same_tokens: bool, first_token_ms: list[float]) -> dict:
    """A way's figures; each run is compared with the bound of the bandwidth read after it."""
    timing = Timing(tuple(times_ms))
    rates = [way.rows * new_tokens / (ms / 1e3) for ms in times_ms]
    bounds = [way.rows * bandwidth / way.weight_bytes for bandwidth in read_bandwidths]
    fractions = [rate / bound for rate, bound in zip(rates, bounds, strict=True)]
    after_first = after_first_rates(way.rows, new_tokens, times_ms, first_token_ms)
    return {
        "name": way.name, "median_ms": timing.median_ms, "min_ms": timing.min_ms,
        "max_ms": timing.max_ms, "runs": len(rates),
        "rows": way.rows, "tokens_per_s": statistics.median(rates), "run_tokens_per_s": rates,
        "weight_bytes_per_token": way.weight_bytes, "bound_tokens_per_s": statistics.median(bounds),
        "run_bound_tokens_per_s": bounds, "bound_fraction": statistics.median(fractions),
        "run_bound_fractions": fractions, "warmup_s": warmup_s, "same_tokens": same_tokens,
        "first_token_ms": statistics.median(first_token_ms), "run_first_token_ms": first_token_ms,
        "after_first_tokens_per_s": median_or_none(after_first),
        "run_after_first_tokens_per_s": after_first,
    }


def time_ways(ways: list[Way], prompt: Tensor, new_tokens: int, warmup: int, runs: int,
              bandwidth: ReadBandwidth) -> list[dict]:
    """Warm every way up (compiling what it compiles), then time them in turns, one run each
    per turn, each run after a run of the prompt and first token alone and followed by a
    read-bandwidth measurement. A row's tokens are compared with those of the first row of its
    dtype."""
    device = prompt.device
    warmup_s, times, firsts_ms, bandwidths, outputs = {}, {}, {}, {}, {}
    for way in ways:
        start = time.perf_counter()
        for _ in range(max(warmup, 1)):
            way.decode(prompt, WARMUP_TOKENS)
        warmup_s[way.name] = time.perf_counter() - start
        times[way.name], firsts_ms[way.name], bandwidths[way.name] = [], [], []
    for turn in range(runs):
        print(f"timing turn {turn + 1}...", flush=True)
        for way in ways:
            first = time_in_turns({"first": lambda way=way: way.decode(prompt, 1)}, device,
                                     runs=1, warmup=0)["first"]
            firsts_ms[way.name] += first.times_ms
            run = time_in_turns({"run": lambda way=way: outputs.update(
                {way.name: way.decode(prompt, new_tokens)})}, device, runs=1, warmup=0)["run"]
            times[way.name] += run.times_ms
            read = time_in_turns({"read": bandwidth}, device, runs=3, warmup=0)["read"]
            bandwidths[way.name].append(bandwidth.bytes_per_s(read))
    firsts: dict[torch.dtype, Tensor] = {}
    return [row(way, times[way.name], new_tokens, bandwidths[way.name], warmup_s[way.name],
                torch.equal(outputs[way.name], firsts.setdefault(way.dtype, outputs[way.name])
                            .repeat(way.rows, 1)), firsts_ms[way.name])
            for way in ways]


def ratio_by_name(rows: list[dict], name: str, other: str, key: str = "run_tokens_per_s"
                  ) -> float | None:
    """The row `name`'s tokens/s over the row `other`'s, turn by turn (median); None where
    either was not timed."""
    by_name = {row["name"]: row for row in rows}
    if name not in by_name or other not in by_name:
        return None
    return turn_ratio(by_name[name], by_name[other], key)


def turn_ratio(row: dict, other: dict, key: str = "run_tokens_per_s") -> float | None:
    """`row`'s tokens/s over `other`'s, turn by turn (median, over the turns both have)."""
    return median_or_none([
        ours / theirs if ours is not None and theirs is not None else None
        for ours, theirs in zip(row[key], other[key], strict=True)])


def format_table(rows: list[dict]) -> str:
    header = (f"{'decoding':<28} {'tokens/s':>9} {'bound':>7} {'of bound':>8} "
              f"{'run ms [min-max]':>24} {'first ms':>8} {'after first':>11} {'warm-up s':>9} "
              f"{'same tokens':>11}")
    lines = [header, "-" * len(header)]
    for row in rows:
        spread = f"{row['median_ms']:,.0f} [{row['min_ms']:,.0f}-{row['max_ms']:,.0f}]"
        after = row["after_first_tokens_per_s"]
        lines.append(
            f"{row['name']:<28} {row['tokens_per_s']:>9.1f} {row['bound_tokens_per_s']:>7.1f} "
            f"{row['bound_fraction']:>8.0%} {spread:>24} {row['first_token_ms']:>8,.0f} "
            f"{'-' if after is None else f'{after:.1f}':>11} {row['warmup_s']:>9.1f} "
            f"{'yes' if row['same_tokens'] else 'NO':>11}")
    lines.append("bound: tokens/s reading the weights at the bandwidth read after each run; "
                 "first ms: the prompt and first token alone; after first: tokens/s of the rest")
    return "\n".join(lines)
