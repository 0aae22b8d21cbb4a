"""`gpt2-decl bench`: compiled vs eager forward passes over a sweep of sequence lengths.

With `--generate`, the decoding benchmark (`gpt2_decl.bench_generate`) runs instead.
"""

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import gpt2_decl
from gpt2_decl import bench
from gpt2_decl.cli.common import add_model_arguments, resolve_device, resolve_dtype
from gpt2_decl.config import DTYPES, GPT2Config
from gpt2_decl.model import GPT2

DEFAULT_SEQS = "16,128,1024"
SIZE_OVERRIDES = ("n_layer", "n_head", "d_model")
# The ratios that read best on a plot's log axes: each tick is a power of two.
PLOT_LOG_BASE = 2
PLOT_SIZE_INCHES = (11, 4.5)
PLOT_DPI = 120


def sequence_lengths(text: str) -> list[int]:
    """`--seq`'s comma-separated list of positive lengths."""
    try:
        seqs = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 16,128,1024, got {text!r}"
        ) from None
    if not seqs or min(seqs) < 1:
        raise argparse.ArgumentTypeError(
            f"sequence lengths must be positive integers, got {text!r}"
        )
    return seqs


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time compiled vs eager forward passes (or decoding, with --generate)",
        description=(
            "Time eager and compiled forward passes at each sequence length: median/min/max ms, "
            "compile time, speedup, tokens/s, FLOP/s as a fraction of a matmul roofline measured "
            "in the same run, compiled-vs-eager logit difference, and typechecked mode's cost."
        ),
    )
    add_model_arguments(parser)
    sizes = parser.add_argument_group("size overrides (on top of --preset)")
    sizes.add_argument("--n-layer", type=positive_int, default=None, help="number of blocks")
    sizes.add_argument("--n-head", type=positive_int, default=None, help="attention heads")
    sizes.add_argument("--d-model", type=positive_int, default=None, help="residual stream width")
    parser.add_argument(
        "--batch", type=positive_int, default=1, help="sequences per forward pass (default: 1)"
    )
    parser.add_argument(
        "--seq",
        type=sequence_lengths,
        default=sequence_lengths(DEFAULT_SEQS),
        help=f"comma-separated sequence lengths, one row each (default: {DEFAULT_SEQS})",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's choice, one per core)",
    )
    parser.add_argument(
        "--runs", type=positive_int, default=5, help="timed runs per measurement (default: 5)"
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=1, help="untimed runs first (default: 1)"
    )
    parser.add_argument(
        "--mode",
        default=bench.DEFAULT_COMPILE_MODE,
        choices=sorted(torch._inductor.list_mode_options()),
        help=f"torch.compile mode (default: {bench.DEFAULT_COMPILE_MODE})",
    )
    parser.add_argument(
        "--freeze",
        action=argparse.BooleanOptionalAction,
        default=bench.DEFAULT_FREEZE,
        help="inductor weight freezing: weights become constants, pre-packed for the CPU's matmuls",
    )
    parser.add_argument(
        "--typecheck-overhead",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time eager with typechecked mode on, and report the extra cost",
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="write the figures as JSON here"
    )
    parser.add_argument(
        "--plot", type=Path, default=None, metavar="PATH", help="draw the sweep as a PNG here"
    )
    decoding = parser.add_argument_group("decoding benchmark")
    decoding.add_argument(
        "--generate",
        action="store_true",
        help="benchmark token-by-token generation (decode tokens/s) instead of forward passes",
    )
    decoding.add_argument(
        "--prompt-len", type=positive_int, default=32, help="prompt tokens (default: 32)"
    )
    decoding.add_argument(
        "--new-tokens", type=positive_int, default=128, help="tokens to generate (default: 128)"
    )
    decoding.add_argument(
        "--checkpoint", default=None, metavar="DIR", help="a Hugging Face-layout GPT-2 directory"
    )
    decoding.add_argument(
        "--compare-dtype",
        default=None,
        choices=sorted(DTYPES),
        help="also decode with the cache in this dtype, in turns with --dtype, and print the "
        "speed ratio",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    gpt2_decl.set_typechecked(args.typecheck or gpt2_decl.is_typechecked())
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.generate:
        # Imported here: the decoding benchmark is a separate module with its own dependencies.
        from gpt2_decl import bench_generate

        write_json(args.json, bench_generate.run(args))
        return
    if args.checkpoint:
        raise SystemExit(
            "error: --checkpoint is used by --generate; forward timings do not depend on weights"
        )

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    config = build_config(args)
    too_long = [seq for seq in args.seq if seq > config.n_ctx]
    if too_long:
        raise SystemExit(f"error: --seq {too_long} longer than the context of {config.n_ctx}")
    model = GPT2(config).to(device=device, dtype=dtype)
    environment = bench.environment(device, dtype)
    dtype_name = environment["dtype"]
    print(
        f"{describe(args, config)}, batch {args.batch}, {dtype_name} on {device} "
        f"({environment['device_name']}, {environment['threads']} threads), "
        f"torch {environment['torch']}"
    )
    if args.typecheck:
        print("typechecked mode is on: every timing includes its checks")
    settings = bench.CompileSettings(mode=args.mode, freeze=args.freeze)
    rows = list(
        bench.benchmark_forward(
            model,
            args.seq,
            batch=args.batch,
            runs=args.runs,
            warmup=args.warmup,
            compile_settings=settings,
            typecheck_overhead=args.typecheck_overhead,
            seed=args.seed,
            log=lambda message: print(message, flush=True),
        )
    )
    print()
    print(format_table(rows))

    report = {
        **environment,
        "preset": args.preset,
        "config": dataclasses.asdict(config),
        "batch": args.batch,
        "compile_mode": settings.mode,
        "freeze": settings.freeze,
        # Each row's roofline was timed beside it; this is their median, for a one-line summary.
        "roofline_flops_per_s": statistics.median(row.roofline_flops_per_s for row in rows),
        "rows": [row.to_dict() for row in rows],
    }
    write_json(args.json, report)
    if args.plot:
        plot(
            rows,
            args.plot,
            title=f"{describe(args, config)}, batch {args.batch}, {dtype_name}, "
            f"{environment['device_name']}, torch {environment['torch']}",
        )
        print(f"plot written to {args.plot}")


def build_config(args: argparse.Namespace) -> GPT2Config:
    overrides = {name: getattr(args, name) for name in SIZE_OVERRIDES}
    try:
        return GPT2Config.from_preset(
            args.preset,
            seed=args.seed,
            **{name: value for name, value in overrides.items() if value is not None},
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def describe(args: argparse.Namespace, config: GPT2Config) -> str:
    """The preset's name, with the sizes that were overridden."""
    overridden = [
        f"{name}={getattr(config, name)}" for name in SIZE_OVERRIDES if getattr(args, name)
    ]
    return f"GPT-2 {args.preset}" + (f" ({', '.join(overridden)})" if overridden else "")


def write_json(path: Path | None, report: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"figures written to {path}", file=sys.stderr)


def format_table(rows: Sequence[bench.ForwardRow]) -> str:
    """One line per sequence length: times are medians, with [min-max] beside eager and compiled."""
    header = (
        f"{'seq':>6} {'eager ms [min-max]':>24} {'compiled ms [min-max]':>24} {'compile s':>9} "
        f"{'speedup':>7} {'tokens/s':>10} {'GFLOP/s':>8} {'peak':>7} {'roofline':>8} "
        f"{'max|diff|':>9} {'typecheck':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        overhead = row.typecheck_overhead
        lines.append(
            f"{row.seq:>6} {spread(row.eager):>24} {spread(row.compiled):>24} "
            f"{row.compile_s:>9.1f} {row.speedup:>6.2f}x {row.tokens_per_s(row.compiled):>10,.0f} "
            f"{row.flops_per_s(row.compiled) / 1e9:>8.1f} {row.roofline_flops_per_s / 1e9:>7.1f} "
            f"{row.roofline_fraction(row.compiled):>8.0%} "
            f"{row.max_abs_diff:>9.1e} {'-' if overhead is None else f'{overhead:+.1%}':>9}"
        )
    lines.append(
        "tokens/s, GFLOP/s and roofline (GFLOP/s / peak) are the compiled model's; peak is a "
        "square matmul's GFLOP/s, timed in turn with the model; typecheck is eager's extra time "
        "with typechecked mode on."
    )
    return "\n".join(lines)


def spread(timing: bench.Timing) -> str:
    return f"{timing.median_ms:.1f} [{timing.min_ms:.1f}-{timing.max_ms:.1f}]"


def plot(rows: Sequence[bench.ForwardRow], path: Path, title: str) -> None:
    """Milliseconds and tokens/s against sequence length, eager beside compiled."""
    # The figure is built without pyplot, so no GUI backend is ever chosen: it renders with Agg.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    time_axes, rate_axes = figure.subplots(1, 2)
    seqs = [row.seq for row in rows]
    for label, timings in (
        ("eager", [row.eager for row in rows]),
        ("compiled", [row.compiled for row in rows]),
    ):
        medians = [timing.median_ms for timing in timings]
        spreads = [
            [m - t.min_ms for m, t in zip(medians, timings, strict=True)],
            [t.max_ms - m for m, t in zip(medians, timings, strict=True)],
        ]
        time_axes.errorbar(seqs, medians, yerr=spreads, marker="o", capsize=3, label=label)
        rate_axes.plot(
            seqs,
            [row.tokens_per_s(timing) for row, timing in zip(rows, timings, strict=True)],
            marker="o",
            label=label,
        )
    time_axes.set(ylabel="forward pass, ms (median, min-max bars)", yscale="log")
    rate_axes.set(ylabel="tokens/s", yscale="log")
    for axes in (time_axes, rate_axes):
        axes.set(xlabel="sequence length (tokens)", xscale="log")
        axes.set_xscale("log", base=PLOT_LOG_BASE)
        axes.set_xticks(seqs, [str(seq) for seq in seqs])
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
