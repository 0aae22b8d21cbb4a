"""What capturing activations costs: the plain compiled forward beside compiled captures of
more and more names, eager capture of everything and, where installed, TransformerLens'
`run_with_cache` on the same weights, all timed in turns, with the bytes captured and each
way's peak memory over a call."""

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from gpt2_decl.core.activations import PATTERN_SITES, all_names, site_of
from gpt2_decl.core.compiling import compile as compile_model
from gpt2_decl.core.timing import Timing, time_in_turns

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class CaptureRow:
    name: str
    timing: Timing
    captured: int  # activations captured
    captured_bytes: int
    peak_bytes: int | None  # the process's resident memory at its highest over one call


def ways_of_capturing(model: nn.Module) -> dict[str, object]:
    """The names each compiled way captures: none, every block's resid_post, every name but
    the patterns (and scores), every name."""
    names = all_names(model.config)
    return {"plain": None,
            "resid_post": "blocks.*.resid_post",
            "all but patterns": [name for name in names if site_of(name) not in PATTERN_SITES],
            "everything": names}


def benchmark_capture(model: nn.Module, tokens: Tensor, *, runs: int, warmup: int,
                      lens: nn.Module | None = None, log: Callable[[str], None] = print
                      ) -> list[CaptureRow]:
    """Time each way in turns (after compiling each once), then measure each way's captured
    bytes and peak memory over one call. `lens` is TransformerLens' model, if compared."""
    compiled = compile_model(model)
    calls: dict[str, Callable[[], object]] = {}
    for way, names in ways_of_capturing(model).items():
        if names is None:
            calls["compiled, plain"] = lambda: (compiled(tokens), {})
        else:
            calls[f"compiled, {way}"] = lambda names=names: compiled.run_with_cache(tokens,
                                                                                    names)
    calls["eager, everything"] = lambda: model.run_with_cache(tokens)
    if lens is not None:
        calls["TransformerLens, everything"] = lambda: lens.run_with_cache(tokens)
    with torch.no_grad():
        for name, call in calls.items():
            log(f"compiling / warming up: {name}")
            call()
        log(f"timing {len(calls)} ways in turn ({warmup} warm-up, {runs} runs)...")
        timings = time_in_turns(calls, model.device, runs=runs, warmup=warmup)
        rows = []
        for name, call in calls.items():
            peak, (_, cache) = _peak_over(call)
            rows.append(CaptureRow(name, timings[name], len(cache),
                                   sum(value.nbytes for value in cache.values()), peak))
    return rows


def _peak_over(call: Callable[[], object]) -> tuple[int | None, object]:
    """The process's peak resident bytes over one call (Linux: the high-water mark reset
    first), and what the call gave."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return None, call()
    result = call()
    found = re.search(r"VmHWM:\s+(\d+) kB", STATUS.read_text())
    return (int(found.group(1)) * 1024 if found else None), result


def format_table(rows: list[CaptureRow]) -> str:
    plain = next(row for row in rows if row.name == "compiled, plain")
    header = (f"{'way':<32} {'ms [min-max]':>26} {'over plain':>10} {'captured':>9} "
              f"{'captured MB':>11} {'peak MB':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        peak = "-" if row.peak_bytes is None else f"{row.peak_bytes / 2**20:,.0f}"
        lines.append(f"{row.name:<32} {row.timing.spread():>26} "
                     f"{row.timing.median_ms / plain.timing.median_ms:>9.2f}x {row.captured:>9} "
                     f"{row.captured_bytes / 2**20:>11,.1f} {peak:>8}")
    lines.append("over plain: each way's median time over the plain compiled forward's; peak: "
                 "the process's resident memory at its highest over one call")
    return "\n".join(lines)


def turn_ratio(rows: list[CaptureRow], name: str, other: str) -> float | None:
    """`other`'s time over `name`'s, turn by turn (median): how many times faster `name` is."""
    by_name = {row.name: row for row in rows}
    if name not in by_name or other not in by_name:
        return None
    pairs = zip(by_name[other].timing.times_ms, by_name[name].timing.times_ms, strict=True)
    return statistics.median(theirs / ours for theirs, ours in pairs)


def transformer_lens_copy(model: nn.Module) -> nn.Module | None:
    """TransformerLens' `TransformerBridge` over transformers' GPT-2 with `model`'s weights, or
    None, said, where TransformerLens (4.x) is not installed. Its tokenizer is a word-level
    stand-in of the same vocabulary size: the bench passes token ids."""
    try:
        from tokenizers import Tokenizer, models
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        print("TransformerLens 4 is not installed (pip install transformer_lens): no row for it")
        return None
    from gpt2_decl.bench.engines import transformers_copy

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(model.config.vocab_size)},
                                       unk_token="t0"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="t0", eos_token="t0",
                                        unk_token="t0", pad_token="t0", add_bos_token=True,
                                        name_or_path="gpt2_decl")
    lens = TransformerBridge.boot_transformers("gpt2", hf_model=transformers_copy(model),
                                               tokenizer=tokenizer, device=str(model.device),
                                               dtype=model.dtype)
    return lens.eval()
