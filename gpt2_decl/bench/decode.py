"""Greedy decoding speed, batch 1, against the memory bound: a step reads every weight once,
so tokens/s <= read bandwidth / bytes of weights. The ways of decoding take turns run by run,
and the read bandwidth is measured right after every run, so each run meets the bound of its
own moment (a shared machine's bandwidth drifts from minute to minute). Each turn also times
the prompt and first token alone, so that the tokens after it are reported on their own too,
as llama.cpp's bench reports prompt processing apart from generation: a batch's prompt is a
batch of prompts, and runs at the speed of arithmetic, not of reading weights."""

import itertools
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import Tensor

from gpt2_decl.bench.measure import ReadBandwidth, Timing, time_interleaved, transformers_copy
from gpt2_decl.core.config import GPT2Config
from gpt2_decl.core.model import GPT2
from gpt2_decl.speedups.huge_pages import move_parameters as move_into_huge_pages
from gpt2_decl.speedups.quantize import Agreement, agreement, parameter_bytes
from gpt2_decl.storage.gguf import save_gguf
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
    return sum(parameter_bytes(p) for p in model.parameters() if id(p) not in skip)


def ways_of_decoding(model: GPT2, *, suffix: str = "", reference: bool = True,
                     huge_pages: bool = False, batches: Sequence[int] = (),
                     eager: bool = True) -> list[Way]:
    """Ours eager (unless not `eager`) and compiled, with the cache, compiled for each of
    `batches` copies of the prompt at once, and transformers' `generate`; huge_pages: every
    model's weights (transformers' too) moved into huge pages first."""
    n_bytes = weight_bytes_per_token(model)
    if huge_pages:
        move_into_huge_pages(model)

    def ours(name: str, compile: bool, rows: int = 1) -> Way:
        def decode(prompt: Tensor, new: int) -> Tensor:
            return generate(model, prompt.repeat(rows, 1), new, greedy=True, compile=compile)

        return Way(name + suffix, decode, n_bytes, model.dtype, rows)

    ways = [ours("eager, cache", False)] if eager else []
    ways.append(ours("compiled, cache", True))
    ways += [ours(f"compiled, cache, batch {rows}", True, rows) for rows in batches if rows > 1]
    if reference and (decode := transformers_generate(model, huge_pages)) is not None:
        ways.append(Way("transformers generate", decode, n_bytes, model.dtype))
    return ways


# A trial decode by llama.cpp in a process of its own (argv: GGUF path, n_ctx, threads, prompt
# tokens, extra buffer types 1 or 0), so that a crash inside llama.cpp leaves the bench standing.
LLAMA_TRIAL = """
import sys
from gpt2_decl.bench.decode import load_llama
path, n_ctx, n_threads, prompt_tokens, extra = sys.argv[1:]
llm = load_llama(path, int(n_ctx), int(n_threads), extra_buffers=extra == "1")
tokens = llm.generate(list(range(int(prompt_tokens))), top_k=1, temp=0.0)
for _ in zip(range(4), tokens, strict=False):
    pass
"""


def load_llama(path: str, n_ctx: int, n_threads: int, extra_buffers: bool = True):
    """llama.cpp's model of a GGUF file; extra_buffers=False loads its weights into plain CPU
    buffers, with none of its extra buffer types (AMX tiles, repacked weights)."""
    import llama_cpp
    import llama_cpp.llama_cpp as api

    defaults = api.llama_model_default_params

    def params_without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with mock.patch.object(api, "llama_model_default_params",
                           defaults if extra_buffers else params_without_extra_buffers):
        return llama_cpp.Llama(path, n_ctx=n_ctx, verbose=False, n_threads=n_threads)


def llama_trial_ends(path: Path, n_ctx: int, prompt_tokens: int, extra_buffers: bool) -> str:
    """How a trial decode of `path` by llama.cpp ended in a process of its own: "" if it
    decoded, else the signal or exit status that ended it."""
    done = subprocess.run([sys.executable, "-c", LLAMA_TRIAL, str(path), str(n_ctx),
                           str(torch.get_num_threads()), str(prompt_tokens),
                           "1" if extra_buffers else "0"], capture_output=True)
    if done.returncode == 0:
        return ""
    if done.returncode < 0:
        return signal.Signals(-done.returncode).name
    return f"exit status {done.returncode}"


def llama_cpp_ways(model: GPT2, directory: str, q8_0: bool = False, prompt_tokens: int = 32
                   ) -> list[Way]:
    """llama.cpp (llama-cpp-python) greedy decoding of the same weights, written as GGUF files
    in F32 and BF16 (and q8_0: F32 quantized by llama.cpp to Q8_0) into `directory`, on as many
    threads as torch. Each file is first decoded in a process of its own, `prompt_tokens` and a
    few more: where that crashes with llama.cpp's extra buffer types (its AMX products die on
    some files) and decodes without them, the file is timed without them, and a line says so."""
    try:
        import llama_cpp
    except ImportError:
        raise ImportError("--compare llama.cpp needs llama-cpp-python: pip install it") from None

    ways, float32_bytes = [], weight_bytes_per_token(model) * 4 // model.dtype.itemsize
    files = {name: save_gguf(model, Path(directory) / f"{name}.gguf", dtype=dtype)
             for name, dtype in (("F32", torch.float32), ("BF16", torch.bfloat16))}
    if q8_0:  # 32 int8 weights and a float16 scale per block: 34 bytes for 32 weights
        files["Q8_0"] = Path(directory) / "Q8_0.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
        if llama_cpp.llama_model_quantize(str(files["F32"]).encode(),
                                          str(files["Q8_0"]).encode(), params) != 0:
            raise RuntimeError("llama.cpp could not quantize the F32 file to Q8_0")
    n_ctx = model.config.n_ctx
    prompt_tokens = min(prompt_tokens, n_ctx - 4)  # the trial's prompt and its four tokens fit
    for name, path in files.items():
        extra_buffers = True
        if ended := llama_trial_ends(path, n_ctx, prompt_tokens, extra_buffers=True):
            if without := llama_trial_ends(path, n_ctx, prompt_tokens, extra_buffers=False):
                raise RuntimeError(f"llama.cpp cannot decode its {name} file: a trial decode "
                                   f"ended with {ended}, and without its extra buffer types "
                                   f"with {without}")
            extra_buffers = False
            print(f"llama.cpp {name}: timed without llama.cpp's extra buffer types (AMX, "
                  f"repacked weights): a trial decode with them ended with {ended}", flush=True)
        llm = load_llama(str(path), n_ctx, torch.get_num_threads(), extra_buffers)

        def decode(prompt: Tensor, new: int, llm=llm) -> Tensor:
            llm.reset()
            tokens = itertools.islice(llm.generate(prompt[0].tolist(), top_k=1, temp=0.0), new)
            return torch.cat([prompt, torch.tensor([list(tokens)])], dim=1)

        bytes_per_weight = {"F32": 4, "BF16": 2, "Q8_0": 34 / 32}[name]
        # Q8_0's tokens are compared with float32's, as our int8's are.
        ways.append(Way(f"llama.cpp {name}", decode, int(float32_bytes * bytes_per_weight / 4),
                        torch.bfloat16 if name == "BF16" else torch.float32))
    return ways


def transformers_generate(model: GPT2, huge_pages: bool = False
                          ) -> Callable[[Tensor, int], Tensor] | None:
    """transformers' greedy `generate` on `model`'s weights (None if it is not installed)."""
    reference = transformers_copy(model)
    if reference is None:
        return None
    if huge_pages:
        move_into_huge_pages(reference)
    reference.generation_config.eos_token_id = None  # exactly the tokens asked for, as ours
    reference.generation_config.pad_token_id = 0

    def decode(prompt: Tensor, new: int) -> Tensor:
        with torch.no_grad():
            return reference.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      max_new_tokens=new, do_sample=False)

    return decode


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
            first = time_interleaved({"first": lambda way=way: way.decode(prompt, 1)}, device,
                                     runs=1, warmup=0)["first"]
            firsts_ms[way.name] += first.times_ms
            run = time_interleaved({"run": lambda way=way: outputs.update(
                {way.name: way.decode(prompt, new_tokens)})}, device, runs=1, warmup=0)["run"]
            times[way.name] += run.times_ms
            read = time_interleaved({"read": bandwidth}, device, runs=3, warmup=0)["read"]
            bandwidths[way.name].append(bandwidth.bytes_per_s(read))
    firsts: dict[torch.dtype, Tensor] = {}
    return [row(way, times[way.name], new_tokens, bandwidths[way.name], warmup_s[way.name],
                torch.equal(outputs[way.name], firsts.setdefault(way.dtype, outputs[way.name])
                            .repeat(way.rows, 1)), firsts_ms[way.name])
            for way in ways]


def speed_ratios(rows: list[dict], suffix: str) -> dict[str, float]:
    """Each way's tokens/s with `suffix` over its tokens/s without, turn by turn (median)."""
    by_name = {row["name"]: row for row in rows}
    return {name: turn_ratio(by_name[name + suffix], by_name[name])
            for name in by_name if name + suffix in by_name}


def quantized_speed_ratios(rows: list[dict], schemes: list[str], floats: dict[str, str]
                           ) -> dict[str, dict[str, float]]:
    """Each quantized scheme's compiled tokens/s over each float model's, turn by turn:
    {scheme: {dtype: ratio}}; `floats` maps each float dtype to its rows' name suffix."""
    by_name = {row["name"]: row for row in rows}
    return {scheme: {dtype: turn_ratio(by_name[f"compiled, cache, {scheme}"],
                                       by_name["compiled, cache" + suffix])
                     for dtype, suffix in floats.items()}
            for scheme in schemes}


def batch_speed_ratios(rows: list[dict]) -> dict[int, dict[str, float | None]]:
    """Each compiled batch's tokens/s over compiled batch 1's, turn by turn (median): whole
    runs, and the tokens after the first ("after_first"; None where no turn has them)."""
    by_name = {row["name"]: row for row in rows}
    single = by_name.get("compiled, cache")
    return {row["rows"]: {"whole": turn_ratio(row, single),
                          "after_first": turn_ratio(row, single, "run_after_first_tokens_per_s")}
            for row in rows if single and row["name"] == f"compiled, cache, batch {row['rows']}"}


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
