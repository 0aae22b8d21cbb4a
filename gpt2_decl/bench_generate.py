"""`gpt2-decl bench --generate`: batch-1 greedy decoding speed against the memory-bandwidth bound.

Decoding one token reads every weight once, so tokens/s <= copy bandwidth / bytes of weights. The
copy bandwidth of a shared machine drifts from minute to minute, so it is measured in this
process between every two timed runs, and each run is compared with the better of the two
measurements around it (neighbours only ever lower it). On a CPU it is also measured between
tensors in huge pages, where compiled decoding keeps the weights, and the higher figure counts.
Every row reads its weights from huge pages there: the compiled rows' warm-up moves those of the
model all our rows share, and transformers' copy is moved too.

The bandwidth can change within a run, so our cached ways are also measured token by token: after
every timed run, one more generation takes its tokens one at a time, and between two tokens
copies that move as many bytes as a step reads are timed. Their time over the decoding's time,
summed over the tokens, is the share of the bound measured at the finest grain there is.
"""

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from gpt2_decl import bench, huge_pages
from gpt2_decl.cli.common import resolve_device, resolve_dtype
from gpt2_decl.generation import generate, stream
from gpt2_decl.model import GPT2

# Without the cache every token reruns the whole context: one run of --new-tokens tokens is long
# enough to average over, and more would take minutes on a CPU.
UNCACHED_RUNS = 1
# Warm-up generations are this short: enough to compile every graph a full run uses.
WARMUP_TOKENS = 2


@dataclass(frozen=True)
class DecodeRow:
    """One way of decoding: its speed against the bound of each run's moment, and whether it
    produced the reference tokens."""

    name: str
    timing: bench.Timing
    new_tokens: int
    warmup_s: float
    # Per timed run: its tokens/s, and the bound (tokens/s) measured around it.
    run_tokens_per_s: tuple[float, ...]
    run_bounds: tuple[float, ...]
    same_tokens: bool
    # Per paired generation (ways that stream only): the bound's time over the decoding's time.
    run_paired_fractions: tuple[float, ...] = ()

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / (self.timing.median_ms / 1e3)

    @property
    def bound_fraction(self) -> float:
        """The median over runs of each run's tokens/s over the bound measured around it."""
        runs = zip(self.run_tokens_per_s, self.run_bounds, strict=True)
        return statistics.median(speed / bound for speed, bound in runs)

    @property
    def paired_fraction(self) -> float | None:
        """The median over paired generations of their share of the bound, if measured."""
        return statistics.median(self.run_paired_fractions) if self.run_paired_fractions else None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "tokens_per_s": self.tokens_per_s,
            "ms_per_token": self.timing.median_ms / self.new_tokens,
            "bound_fraction": self.bound_fraction,
            "bound_tokens_per_s": statistics.median(self.run_bounds),
            "run_tokens_per_s": list(self.run_tokens_per_s),
            "run_bounds_tokens_per_s": list(self.run_bounds),
            "median_ms": self.timing.median_ms,
            "min_ms": self.timing.min_ms,
            "max_ms": self.timing.max_ms,
            "runs": self.timing.runs,
            "warmup_s": self.warmup_s,
            "same_tokens": self.same_tokens,
            "paired_bound_fraction": self.paired_fraction,
            "run_paired_bound_fractions": list(self.run_paired_fractions),
        }


def weight_bytes_per_token(model: GPT2) -> int:
    """Bytes of weights one decode step reads: every parameter once (the tied embedding once,
    as the output head), except the position embedding, of which it reads one row."""
    total = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    position_embedding = model.position_embedding.weight
    return total - position_embedding.numel() * position_embedding.element_size()


def run(args: argparse.Namespace) -> dict:
    """Time greedy decoding of --new-tokens after a --prompt-len prompt, batch 1: eager and
    compiled, with and without the cache, and transformers' `generate` on the same weights; with
    --compare-dtype, also decoding with the cache in that dtype. The ways of decoding take turns
    run by run, so that a change in the machine's speed falls on all of them alike."""
    from gpt2_decl.cli.bench import build_config

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if args.compare_dtype == args.dtype:
        raise SystemExit(f"error: --compare-dtype {args.compare_dtype} is already --dtype")
    if args.checkpoint:
        model = GPT2.from_pretrained(args.checkpoint, dtype=dtype, device=device)
    else:
        model = GPT2(build_config(args)).to(device=device, dtype=dtype).eval()
    config = model.config
    if args.prompt_len + args.new_tokens > config.n_ctx:
        raise SystemExit(
            f"error: --prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceed the "
            f"context of {config.n_ctx}"
        )
    environment = bench.environment(device, dtype)
    weights = args.checkpoint or f"random weights (preset {args.preset})"
    print(
        f"GPT-2 n_layer={config.n_layer} n_head={config.n_head} d_model={config.d_model}, "
        f"{weights}, {environment['dtype']} on {device} ({environment['device_name']}, "
        f"{environment['threads']} threads), torch {environment['torch']}: batch 1, "
        f"{args.prompt_len}-token prompt, {args.new_tokens} greedy tokens"
    )
    prompt = bench.random_tokens(config, 1, args.prompt_len, device, args.seed)
    ways = decoders(model, args.runs)
    if args.compare_dtype:
        # The same weights, rounded to the other dtype.
        other = copy.deepcopy(model).to(resolve_dtype(args.compare_dtype))
        ways += [
            dataclasses.replace(way, name=f"{way.name}, {args.compare_dtype}")
            for way in decoders(other, args.runs, reference=False)
            if way.name in COMPARED
        ]
    bandwidth = BandwidthTrace(device)
    rows = time_decoders(ways, prompt, args.new_tokens, args.warmup, bandwidth)

    bandwidths = bandwidth.measured
    median_bandwidth = statistics.median(bandwidths)
    n_bytes = weight_bytes_per_token(model)
    print()
    print(
        f"weights read per token: {n_bytes / 1e6:,.1f} MB; copy bandwidth measured between "
        f"timed runs, best of ordinary memory and huge pages: median {median_bandwidth / 1e9:.1f} "
        f"GB/s [{min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f}], a bound of "
        f"{median_bandwidth / n_bytes:.1f} tokens/s; each run is compared with the bound "
        "measured around it"
    )
    print(format_table(rows))
    report = {
        **environment,
        "config": dataclasses.asdict(config),
        "checkpoint": args.checkpoint,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "copy_bandwidth_bytes_per_s": median_bandwidth,
        "copy_bandwidths_bytes_per_s": bandwidths,
        "weight_bytes_per_token": n_bytes,
        "bound_tokens_per_s": median_bandwidth / n_bytes,
        "rows": [row.to_dict() for row in rows],
    }
    if args.compare_dtype:
        ratios = speed_ratios(rows, args.compare_dtype)
        for name, ratio in ratios.items():
            print(
                f"{args.compare_dtype} / {environment['dtype']}, {name}: {ratio:.2f}x "
                "(median over runs of the ratio within each turn)"
            )
        weight_bytes = {way.name: way.weight_bytes for way in ways}
        paired_ratios = paired_speed_ratios(rows, args.compare_dtype, weight_bytes)
        for name, ratio in paired_ratios.items():
            print(
                f"{args.compare_dtype} / {environment['dtype']}, {name}, at equal memory speed: "
                f"{ratio:.2f}x (paired shares of the bound over the bytes each reads)"
            )
        report["compare_dtype"] = args.compare_dtype
        report["compare_dtype_speed_ratios"] = ratios
        report["compare_dtype_paired_speed_ratios"] = paired_ratios
    return report


def speed_ratios(rows: list[DecodeRow], compare_dtype: str) -> dict[str, float]:
    """For each way of decoding timed in both dtypes: its tokens/s in `compare_dtype` over its
    tokens/s in the main dtype, turn by turn, the median."""
    by_name = {row.name: row for row in rows}
    ratios = {}
    for name in COMPARED:
        ours, other = by_name[name], by_name[f"{name}, {compare_dtype}"]
        turns = zip(other.run_tokens_per_s, ours.run_tokens_per_s, strict=True)
        ratios[name] = statistics.median(theirs / mine for theirs, mine in turns)
    return ratios


def paired_speed_ratios(
    rows: list[DecodeRow], compare_dtype: str, weight_bytes: dict[str, int]
) -> dict[str, float]:
    """For each way of decoding timed in both dtypes: the ratio of their speeds at one and the
    same memory bandwidth, from their paired shares of the bound (share x bandwidth / bytes read
    per token is tokens/s)."""
    by_name = {row.name: row for row in rows}
    ratios = {}
    for name in COMPARED:
        other_name = f"{name}, {compare_dtype}"
        ours, other = by_name[name].paired_fraction, by_name[other_name].paired_fraction
        ratios[name] = (other / weight_bytes[other_name]) / (ours / weight_bytes[name])
    return ratios


class BandwidthTrace:
    """Copy bandwidth measured between timed runs: `around_next_run` gives the better of the
    measurements just before and just after a run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.measured = [best_copy_bandwidth(device)]

    def around_next_run(self, run: Callable[[], object]) -> float:
        before = self.measured[-1]
        run()
        self.measured.append(best_copy_bandwidth(self.device))
        return max(before, self.measured[-1])


def page_kinds(device: torch.device) -> list[bool]:
    """Whether in huge pages, for each kind of memory copied: ordinary memory and, on a CPU
    that has them, huge pages."""
    return [False, True] if device.type == "cpu" and huge_pages.available() else [False]


def best_copy_bandwidth(device: torch.device) -> float:
    """The copy bandwidth of each of `page_kinds`: the higher."""
    return max(
        bench.measure_copy_bandwidth(device, huge_pages=kind) for kind in page_kinds(device)
    )


@dataclass(frozen=True)
class Decoder:
    """A way of decoding: decode(prompt, new_tokens) -> tokens, how many runs to time, the bytes
    of weights it reads per token and their dtype; for the paired measurement, the same decoding
    as stream(prompt, new_tokens) -> an iterator of each step's tokens."""

    name: str
    decode: Callable[[Tensor, int], Tensor]
    runs: int
    weight_bytes: int
    dtype: torch.dtype
    stream: Callable[[Tensor, int], Iterator[Tensor]] | None = None


# The ways of decoding that --compare-dtype times in the other dtype too.
COMPARED = ("eager, cache", "compiled, cache")


def decoders(model: GPT2, runs: int, *, reference: bool = True) -> list[Decoder]:
    """Every way of decoding with `model`, and transformers' `generate` if `reference`."""
    n_bytes = weight_bytes_per_token(model)

    def ours(name: str, compile: bool, use_cache: bool, runs: int) -> Decoder:
        options = dict(greedy=True, compile=compile, use_cache=use_cache)

        def decode(prompt: Tensor, new: int) -> Tensor:
            return generate(model, prompt, new, **options)

        def tokens(prompt: Tensor, new: int) -> Iterator[Tensor]:
            return stream(model, prompt, new, **options)

        # Uncached steps read the weights and recompute the whole context: not a weight stream.
        return Decoder(name, decode, runs, n_bytes, model.dtype, tokens if use_cache else None)

    ways = [
        ours("eager, cache", False, True, runs),
        ours("compiled, cache", True, True, runs),
        ours("eager, no cache", False, False, min(runs, UNCACHED_RUNS)),
        ours("compiled, no cache", True, False, min(runs, UNCACHED_RUNS)),
    ]
    transformers_decode = transformers_decoder(model) if reference else None
    if transformers_decode is not None:
        ways.append(
            Decoder("transformers generate", transformers_decode, runs, n_bytes, model.dtype)
        )
    return ways


def transformers_decoder(model: GPT2) -> Callable[[Tensor, int], Tensor] | None:
    """transformers' greedy `generate` on `model`'s weights, or None when it is not installed."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        print("transformers is not installed: no reference row")
        return None
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        reference = GPT2LMHeadModel.from_pretrained(directory, dtype=model.dtype).to(model.device)
    reference.eval()
    if model.device.type == "cpu":
        # Where our decoding keeps its weights once compiled (the eager rows share that model).
        huge_pages.move_parameters(reference)
    # Every run makes exactly the tokens asked for, as ours do without an eos_id.
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0

    def decode(prompt: Tensor, new: int) -> Tensor:
        with torch.no_grad():
            return reference.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new,
                do_sample=False,
            )

    return decode


def time_decoders(
    ways: list[Decoder], prompt: Tensor, new_tokens: int, warmup: int, bandwidth: BandwidthTrace
) -> list[DecodeRow]:
    """Warm every way up on short generations (compiling whatever it compiles), then time them
    in turns, one run each per turn, each run between two measurements of the copy bandwidth.
    A row's tokens are compared with those of the first row of its dtype."""
    warmup_s = {}
    for way in ways:
        start = time.perf_counter()
        for _ in range(max(warmup, 1)):
            way.decode(prompt, WARMUP_TOKENS)
        warmup_s[way.name] = time.perf_counter() - start
    times_ms: dict[str, list[float]] = {way.name: [] for way in ways}
    bounds: dict[str, list[float]] = {way.name: [] for way in ways}
    paired: dict[str, list[float]] = {way.name: [] for way in ways}
    outputs: dict[str, Tensor] = {}
    for turn in range(max(way.runs for way in ways)):
        print(f"timing turn {turn + 1}...", flush=True)
        for way in (way for way in ways if turn < way.runs):

            def timed_run(way: Decoder = way) -> None:
                def decode() -> None:
                    outputs[way.name] = way.decode(prompt, new_tokens)

                run = bench.time_call(decode, bandwidth.device, runs=1, warmup=0)
                times_ms[way.name].append(run.median_ms)

            bounds[way.name].append(bandwidth.around_next_run(timed_run) / way.weight_bytes)
            if way.stream is not None:
                paired[way.name].append(
                    paired_bound_fraction(way, prompt, new_tokens, bandwidth.device)
                )
    rows, references = [], {}
    for way in ways:
        times = times_ms[way.name]
        tokens = outputs[way.name]
        reference = references.setdefault(way.dtype, tokens)
        rows.append(
            DecodeRow(
                way.name,
                bench.Timing(statistics.median(times), min(times), max(times), len(times)),
                new_tokens,
                warmup_s[way.name],
                tuple(new_tokens / (ms / 1e3) for ms in times),
                tuple(bounds[way.name]),
                same_tokens=torch.equal(tokens, reference),
                run_paired_fractions=tuple(paired[way.name]),
            )
        )
    return rows


class StepCopies:
    """Copies that each move as many bytes as one decode step reads (half read, half written):
    in ordinary memory and, on a CPU that has them, in huge pages. `seconds()` times one of each
    and gives the faster: the least time a step's reads could take at that moment."""

    def __init__(self, step_bytes: int, device: torch.device):
        self.device = device
        n_bytes = step_bytes // bench.BYTES_MOVED_PER_BYTE_COPIED
        self.pairs = []
        for in_huge_pages in page_kinds(device):
            source, target = bench.copy_buffers(n_bytes, device, huge_pages=in_huge_pages)
            target.copy_(source)  # the first copy also maps the target's pages: untimed
            self.pairs.append((source, target))

    def seconds(self) -> float:
        times = []
        for source, target in self.pairs:
            start = time.perf_counter()
            target.copy_(source)
            bench.synchronize(self.device)
            times.append(time.perf_counter() - start)
        return min(times)


def paired_bound_fraction(
    way: Decoder, prompt: Tensor, new_tokens: int, device: torch.device
) -> float:
    """Generate with `way` one token at a time, timing each token's decoding and, between two
    tokens, the least time the weights' reads could take (`StepCopies`): the sum of the latter
    over the sum of the former. The prompt's pass counts in the first token's time."""
    copies = StepCopies(way.weight_bytes, device)
    tokens = way.stream(prompt, new_tokens)
    decode_s = bound_s = 0.0
    while True:
        start = time.perf_counter()
        token = next(tokens, None)
        bench.synchronize(device)
        if token is None:
            return bound_s / decode_s
        decode_s += time.perf_counter() - start
        bound_s += copies.seconds()


def format_table(rows: list[DecodeRow]) -> str:
    header = (
        f"{'decoding':<26} {'tokens/s':>9} {'ms/token':>9} {'of bound':>8} {'paired':>6} "
        f"{'run ms [min-max]':>24} {'warm-up s':>9} {'same tokens':>11}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        timing = row.timing
        spread = f"{timing.median_ms:,.0f} [{timing.min_ms:,.0f}-{timing.max_ms:,.0f}]"
        paired = "-" if row.paired_fraction is None else f"{row.paired_fraction:.0%}"
        lines.append(
            f"{row.name:<26} {row.tokens_per_s:>9.1f} {timing.median_ms / row.new_tokens:>9.1f} "
            f"{row.bound_fraction:>8.0%} {paired:>6} {spread:>24} {row.warmup_s:>9.1f} "
            f"{'yes' if row.same_tokens else 'NO':>11}"
        )
    return "\n".join(lines)
