"""What capturing activations costs: the plain compiled forward beside compiled captures of
more and more names, eager capture of everything and, where installed, TransformerLens'
`run_with_cache` on the same weights, timed in turns, with the bytes captured, the fresh memory
each call faults in and each way's peak memory over a call.

Each way runs in a process of its own. A capture writes up to gigabytes a call, and how much of
that lands in fresh pages depends on what malloc kept from earlier frees: in one shared process
each way would run on the memory the others freed, not on what its own calls leave behind."""

import contextlib
import importlib.util
import multiprocessing
import re
import resource
import statistics
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gpt2_decl.bench.measure import random_tokens
from gpt2_decl.core.activations import PATTERN_SITES, all_names, site_of
from gpt2_decl.core.compiling import SpeedPlan
from gpt2_decl.core.compiling import compile as compile_model
from gpt2_decl.core.config import GPT2Config
from gpt2_decl.core.devices import synchronize
from gpt2_decl.core.model import GPT2
from gpt2_decl.core.timing import Timing, time_in_turns
from gpt2_decl.core.typecheck import set_typechecked

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"
TRANSFORMER_LENS = "TransformerLens, everything"
# How long a way's process may take to build, compile and warm up, or to answer a request.
PROCESS_TIMEOUT_S = 3600


@dataclass(frozen=True)
class CaptureRow:
    name: str
    timing: Timing
    captured: int  # activations captured
    captured_bytes: int
    fresh_bytes: int  # memory the call faulted in (minor page faults x page size)
    peak_bytes: int | None  # the most resident memory one call added to its process's


@dataclass(frozen=True)
class Setup:
    """What every way's process builds: GPT-2 of `config` (its seeded random weights) in
    `dtype` on `device`, random tokens (`batch` x `seq`, from `seed`), and the process's
    settings (`threads`, typechecked mode, malloc keeping freed memory). With a speed-up
    `plan`, the compiled ways compile with it."""

    config: GPT2Config
    dtype: torch.dtype
    device: str
    batch: int
    seq: int
    seed: int = 0
    threads: int | None = None
    typecheck: bool = False
    keep_freed_memory: bool = False
    plan: SpeedPlan | None = None


def ways_of_capturing(config: GPT2Config) -> dict[str, object]:
    """The names each compiled way captures: none, every block's resid_post, every name but
    the patterns (and scores), every name."""
    names = all_names(config)
    return {"plain": None,
            "resid_post": "blocks.*.resid_post",
            "all but patterns": [name for name in names if site_of(name) not in PATTERN_SITES],
            "everything": names}


def way_names(config: GPT2Config, compare_lens: bool) -> list[str]:
    """Every way the bench times, in the order of its turns and its table."""
    compiled = [f"compiled, {way}" for way in ways_of_capturing(config)]
    return [*compiled, "eager, everything", *([TRANSFORMER_LENS] if compare_lens else [])]


def transformer_lens_installed() -> bool:
    """Whether TransformerLens can be compared, saying so where it cannot."""
    if importlib.util.find_spec("transformer_lens") is None:
        print("TransformerLens 4 is not installed (pip install transformer_lens): no row for it")
        return False
    return True


def benchmark_capture(setup: Setup, *, runs: int, warmup: int, compare_lens: bool = False,
                      together: bool | None = None, log: Callable[[str], None] = print
                      ) -> list[CaptureRow]:
    """Start each way's process (which builds, compiles and warms it up; `together`: all at
    once, by default on a GPU), time the ways in turns, then measure each way's captures,
    fresh memory and peak over one more call."""
    if together is None:
        # A GPU machine compiles the ways side by side on its many cores; a CPU one at a
        # time, each with every core, and never with two ways' memory at its peak at once.
        together = torch.device(setup.device).type != "cpu"
    with contextlib.ExitStack() as stack:
        processes: dict[str, WayProcess] = {}
        for way in way_names(setup.config, compare_lens):
            log(f"compiling / warming up in a process of its own: {way}")
            processes[way] = stack.enter_context(WayProcess(way, setup))
            if not together:
                processes[way].wait_until_ready()
        for process in processes.values():
            process.wait_until_ready()
        log(f"timing {len(processes)} ways in turn ({warmup} warm-up, {runs} runs)...")
        timings = time_in_turns({way: process.run for way, process in processes.items()},
                                runs=runs, warmup=warmup)
        return [CaptureRow(way, timings[way], *process.measure())
                for way, process in processes.items()]


class WayProcess:
    """One way of capturing, built and run in a process of its own, which shares neither the
    parent's memory nor its threads (forked from a server that has imported torch and inductor
    and run nothing, or spawned where there is no fork). `run` runs the way once and returns
    when the process's device has finished."""

    def __init__(self, way: str, setup: Setup):
        self.way, self.ready = way, False
        context = _process_context()
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(way, setup, theirs), daemon=True)
        self.process.start()
        theirs.close()

    def wait_until_ready(self) -> None:
        """Wait until the way is built, compiled and warmed up."""
        if not self.ready:
            self._answer()
            self.ready = True

    def run(self) -> None:
        self.connection.send("run")
        self._answer()

    def measure(self) -> tuple[int, int, int, int | None]:
        """Over one call: the activations captured, their bytes, the fresh bytes, the peak."""
        self.connection.send("measure")
        return self._answer()

    def _answer(self) -> object:
        if not self.connection.poll(PROCESS_TIMEOUT_S):
            raise RuntimeError(f"{self.way}: its process gave no answer in {PROCESS_TIMEOUT_S} s")
        try:
            kind, value = self.connection.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"{self.way}: its process ended (exit code "
                               f"{self.process.exitcode}) without an answer") from None
        if kind == "error":
            raise RuntimeError(f"{self.way}: its process failed:\n{value}")
        return value

    def __enter__(self) -> "WayProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.connection.send("stop")
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _process_context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "torch._inductor.compile_fx"])
    return context


def _serve(way: str, setup: Setup, connection) -> None:
    """A way's process: build, compile and warm up; then run or measure the way on request."""
    try:
        if setup.keep_freed_memory:
            from gpt2_decl.speedups.freed_memory import keep_freed_memory

            keep_freed_memory()
        if setup.threads:
            torch.set_num_threads(setup.threads)
        set_typechecked(setup.typecheck)
        call, device = _build(way, setup), torch.device(setup.device)
        with torch.no_grad():
            call()
            connection.send(("ready", None))
            while (request := connection.recv()) != "stop":
                if request == "run":
                    call()
                    synchronize(device)
                    connection.send(("done", None))
                else:
                    connection.send(("measured", _measure(call, device)))
    except Exception:
        connection.send(("error", traceback.format_exc()))


def _build(way: str, setup: Setup) -> Callable[[], tuple[Tensor, dict]]:
    """The way's call (logits and what it captured) on its own copy of the model and tokens."""
    model = GPT2(setup.config).to(device=setup.device, dtype=setup.dtype).eval()
    tokens = random_tokens(setup.config.vocab_size, setup.batch, setup.seq, model.device,
                           setup.seed)
    if way == TRANSFORMER_LENS:
        lens = transformer_lens_copy(model)
        return lambda: lens.run_with_cache(tokens)
    if way == "eager, everything":
        return lambda: model.run_with_cache(tokens)
    names = ways_of_capturing(setup.config)[way.removeprefix("compiled, ")]
    compiled = compile_model(model, plan=setup.plan)
    if names is None:
        return lambda: (compiled(tokens), {})
    return lambda: compiled.run_with_cache(tokens, names)


def _measure(call: Callable[[], tuple[Tensor, dict]], device: torch.device
             ) -> tuple[int, int, int, int | None]:
    """The activations one call captures, their bytes, the bytes it faulted in, and the most
    resident memory it added to its process's (Linux: the high-water mark reset first)."""
    try:
        with open(CLEAR_REFS, "w") as clear_refs:
            clear_refs.write("5")
        before = _status_bytes("VmRSS")
    except OSError:
        before = None
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    _, cache = call()
    synchronize(device)
    fresh = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) * resource.getpagesize()
    peak = None if before is None else _status_bytes("VmHWM") - before
    return len(cache), sum(value.nbytes for value in cache.values()), fresh, peak


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    with open(STATUS) as status:
        return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1)) * 1024


def format_table(rows: list[CaptureRow]) -> str:
    plain = next(row for row in rows if row.name == "compiled, plain")
    header = (f"{'way':<32} {'ms [min-max]':>26} {'over plain':>10} {'captured':>9} "
              f"{'captured MB':>11} {'fresh MB':>9} {'peak MB':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        peak = "-" if row.peak_bytes is None else f"{row.peak_bytes / 2**20:,.0f}"
        lines.append(f"{row.name:<32} {row.timing.spread():>26} "
                     f"{row.timing.median_ms / plain.timing.median_ms:>9.2f}x {row.captured:>9} "
                     f"{row.captured_bytes / 2**20:>11,.1f} {row.fresh_bytes / 2**20:>9,.0f} "
                     f"{peak:>8}")
    lines.append("each way in a process of its own; over plain: its median time over the plain "
                 "compiled forward's; fresh: the memory one call faulted in; peak: the most "
                 "resident memory one call added to its process's")
    return "\n".join(lines)


def turn_ratio(rows: list[CaptureRow], name: str, other: str) -> float | None:
    """`other`'s time over `name`'s, turn by turn (median): how many times faster `name` is."""
    by_name = {row.name: row for row in rows}
    if name not in by_name or other not in by_name:
        return None
    pairs = zip(by_name[other].timing.times_ms, by_name[name].timing.times_ms, strict=True)
    return statistics.median(theirs / ours for theirs, ours in pairs)


def transformer_lens_copy(model: nn.Module) -> nn.Module:
    """TransformerLens' `TransformerBridge` over transformers' GPT-2 with `model`'s weights
    (TransformerLens 4.x). Its tokenizer is a word-level stand-in of the same vocabulary size:
    the bench passes token ids."""
    from tokenizers import Tokenizer, models
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerFast

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
