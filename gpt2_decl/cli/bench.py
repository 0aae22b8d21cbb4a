"""`gpt2-decl bench`: compiled vs eager forward passes over sequence lengths, or, with
`--generate`, decoding speed against the memory bound; with `--tune`, also with a speed-up plan
tuned in the run, each beside the others in turns."""

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from gpt2_decl.bench import capture, decode, forward
from gpt2_decl.bench.engines import transformers_copy
from gpt2_decl.bench.measure import ReadBandwidth, environment, random_tokens
from gpt2_decl.cli import common
from gpt2_decl.core.config import DTYPES
from gpt2_decl.core.model import GPT2
from gpt2_decl.core.typecheck import is_typechecked, set_typechecked
from gpt2_decl.speedups import tune
from gpt2_decl.speedups.freed_memory import keep_freed_memory
from gpt2_decl.speedups.quantize import SCHEMES, quantize

SIZE_OVERRIDES = ("n_layer", "n_head", "d_model")
STDLIB_JSON = Path(sysconfig.get_paths()["stdlib"]) / "json"
# torch.compile's modes (named here: asking inductor for them would import it, for seconds).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Our rows compared with llama.cpp's files: (its file type, our dtype or scheme).
LLAMA_PAIRS = (("F32", "float32"), ("BF16", "bfloat16"), ("Q8_0", "int8"))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="time compiled vs eager forward passes (or decoding, with --generate)",
        description="Eager against compiled forward passes at each sequence length; with "
        "--generate, decoding tokens/s against the memory bound; with --tune, also compiled "
        "with a speed-up plan tuned here. See docs/benchmarks.md.")
    common.add_model_arguments(parser)
    positive, at_least_0 = common.positive_int, common.non_negative_int
    for name, text in (("n_layer", "blocks"), ("n_head", "heads"), ("d_model", "width")):
        parser.add_argument(f"--{name.replace('_', '-')}", type=positive, help=f"{text}, "
                            "overriding the preset's")
    parser.add_argument("--batch", type=common.positive_ints, default=[1],
                        help="sequences per pass (default: 1); decoding takes a list: 1,4,16")
    parser.add_argument("--seq", type=common.positive_ints, default=[16, 128, 1024],
                        help="comma-separated sequence lengths (default: 16,128,1024)")
    parser.add_argument("--threads", type=positive, help="CPU threads (default: torch's)")
    parser.add_argument("--runs", type=positive, default=5, help="timed runs (default: 5)")
    parser.add_argument("--warmup", type=at_least_0, default=1, help="untimed runs first")
    parser.add_argument("--mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile mode of the plain compiled model (default: default)")
    parser.add_argument("--freeze", action="store_true",
                        help="compile the plain model with inductor's weight freezing")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="first have malloc keep large freed buffers for reuse, for the "
                        "whole process: every model timed (with --capture, in every way's own "
                        "process) (speedups.freed_memory)")
    parser.add_argument("--tune", action="store_true",
                        help="also time the model compiled with a speed-up plan tuned here, for "
                        "each sequence length (forward) or batch and kind of model (decoding); "
                        "with --capture, compile the compiled ways with it instead")
    parser.add_argument("--compare", choices=["llama.cpp", "transformers", "transformer_lens"],
                        help="forward passes: also transformers' model compiled, on the same "
                        "weights; decoding: also llama.cpp on the same weights, F32 and BF16, "
                        "and Q8_0 with --quantize (needs llama-cpp-python and gguf); capture: "
                        "also TransformerLens' run_with_cache (needs transformer_lens)")
    parser.add_argument("--capture", action="store_true",
                        help="time capturing activations instead: compiled capture of more and "
                        "more names beside the plain forward, at the largest --seq")
    parser.add_argument("--typecheck-overhead", action=argparse.BooleanOptionalAction,
                        default=True, help="also time eager with typechecked mode on")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="draw the sweep as a PNG")
    decoding = parser.add_argument_group("decoding (--generate)")
    decoding.add_argument("--generate", action="store_true", help="time decoding instead")
    decoding.add_argument("--prompt-len", type=positive, default=32, help="default: 32")
    decoding.add_argument("--new-tokens", type=positive, default=128, help="default: 128")
    decoding.add_argument("--checkpoint", metavar="DIR", help="weights to load (default: random)")
    decoding.add_argument("--compare-dtype", choices=sorted(DTYPES),
                          help="also decode with the weights in this dtype, in turns")
    decoding.add_argument("--quantize", type=schemes, default=[], metavar="SCHEMES",
                          help=f"also decode quantized copies ({', '.join(SCHEMES)}) in turns, "
                          "and measure their agreement with the model on --quality-data")
    decoding.add_argument("--quality-data", type=Path, default=STDLIB_JSON, metavar="PATH",
                          help="text for --quantize's agreement (default: the standard "
                          "library's json package sources)")
    parser.set_defaults(handler=run)


def schemes(text: str) -> list[str]:
    """An argparse type: a comma-separated list of quantization schemes."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in SCHEMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected schemes among {', '.join(SCHEMES)}, got {text!r}")
    return list(dict.fromkeys(names))


def run(args: argparse.Namespace) -> None:
    set_typechecked(args.typecheck or is_typechecked())
    if not args.generate and len(args.batch) > 1:
        raise SystemExit("error: forward passes take one --batch; a list is for --generate")
    if not args.generate and args.quantize:
        raise SystemExit("error: --quantize is for --generate (int8 is for decoding)")
    if args.compare == "llama.cpp" and not args.generate:
        raise SystemExit("error: --compare llama.cpp is for --generate (decoding)")
    if args.compare == "transformers" and args.generate:
        raise SystemExit("error: --compare transformers is for forward passes; decoding always "
                         "times transformers' generate")
    if args.capture and args.generate:
        raise SystemExit("error: --capture times forward passes, not decoding: drop one")
    if args.compare == "transformer_lens" and not args.capture:
        raise SystemExit("error: --compare transformer_lens is for --capture")
    if args.capture and args.compare not in (None, "transformer_lens"):
        raise SystemExit(f"error: --capture compares with transformer_lens, not {args.compare}")
    if args.checkpoint and not args.generate:
        raise SystemExit("error: --checkpoint is for --generate (weights do not change speed)")
    if args.threads:
        if args.threads > (os.cpu_count() or args.threads):
            print(f"warning: --threads {args.threads} is more than this machine's "
                  f"{os.cpu_count()} CPUs: the threads will share cores", file=sys.stderr)
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    if args.tune and device.type != "cpu":
        raise SystemExit(f"error: --tune makes a plan of CPU speed-ups; the model is on {device}")
    kept = args.keep_freed_memory and keep_freed_memory()
    if args.keep_freed_memory and not kept:
        print("warning: --keep-freed-memory: this C library's malloc is not glibc's; nothing "
              "changed", file=sys.stderr)
    overrides = {name: getattr(args, name) for name in SIZE_OVERRIDES if getattr(args, name)}
    model = common.load_model(args, device, dtype, overrides)
    report = {**environment(device, dtype), "config": dataclasses.asdict(model.config),
              "keep_freed_memory": kept}
    sizes = (f"decoding {args.prompt_len} + {args.new_tokens} tokens" if args.generate
             else f"with batch {args.batch[0]} at sequence lengths {args.seq}")
    runner = run_decode if args.generate else run_capture if args.capture else run_forward
    with common.explained_out_of_memory(device, sizes):
        report |= runner(args, model)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def run_forward(args: argparse.Namespace, model: GPT2) -> dict:
    too_long = [seq for seq in args.seq if seq > model.config.n_ctx]
    if too_long:
        raise SystemExit(f"error: --seq {too_long} longer than the context of {model.config.n_ctx}")
    batch = args.batch[0]
    print(f"{describe(model)}, batch {batch}, {model.dtype} on {model.device}")
    reference = transformers_copy(model) if args.compare == "transformers" else None
    planner = (lambda seq: tune(model, batch=batch, seq=seq, decoding=False)) \
        if args.tune else None
    rows = list(forward.benchmark_forward(
        model, args.seq, batch=batch, runs=args.runs, warmup=args.warmup, mode=args.mode,
        freeze=args.freeze, tune=planner, typecheck_overhead=args.typecheck_overhead,
        reference=reference, seed=args.seed, log=lambda message: print(message, flush=True)))
    print("\n" + forward.format_table(rows))
    if args.plot:
        plot(rows, args.plot, title=f"{describe(model)}, batch {batch}, {model.dtype}")
    return {"preset": args.preset, "batch": batch, "compile_mode": args.mode,
            "freeze": args.freeze, "tune": args.tune, "rows": [row.to_dict() for row in rows],
            "roofline_flops_per_s": statistics.median(r.roofline_flops_per_s for r in rows)}


def run_capture(args: argparse.Namespace, model: GPT2) -> dict:
    seq, batch = max(args.seq), args.batch[0]
    if seq > model.config.n_ctx:
        raise SystemExit(f"error: --seq {seq} longer than the context of {model.config.n_ctx}")
    print(f"{describe(model)}, batch {batch}, {seq} tokens, {model.dtype} on {model.device}")
    compare_lens = args.compare == "transformer_lens" and capture.transformer_lens_installed()
    plan = tune(model, batch=batch, seq=seq, decoding=False) if args.tune else None
    if plan is not None:
        print(f"the compiled ways compile with this plan:\n{plan}", flush=True)
    setup = capture.Setup(model.config, model.dtype, str(model.device), batch, seq, args.seed,
                          threads=args.threads, typecheck=is_typechecked(),
                          keep_freed_memory=bool(args.keep_freed_memory), plan=plan)
    rows = capture.benchmark_capture(setup, runs=args.runs, warmup=args.warmup,
                                     compare_lens=compare_lens,
                                     log=lambda message: print(message, flush=True))
    print("\n" + capture.format_table(rows))
    figures = {}
    for ours in ("compiled, everything", "eager, everything"):
        ratio = capture.turn_ratio(rows, ours, "TransformerLens, everything")
        if ratio is not None:
            figures[f"{ours} over TransformerLens"] = ratio
            print(f"{ours}: {ratio:.2f}x faster than TransformerLens' run_with_cache "
                  "(median over turns)")
    for way in ("resid_post", "all but patterns", "everything"):
        figures[f"compiled, {way} / plain"] = 1 / capture.turn_ratio(
            rows, f"compiled, {way}", "compiled, plain")
    return {"batch": batch, "seq": seq, "plan": None if plan is None else plan.to_dict(),
            "speed_ratios": figures,
            "rows": [{"name": row.name, "median_ms": row.timing.median_ms,
                      "runs_ms": list(row.timing.times_ms), "captured": row.captured,
                      "captured_bytes": row.captured_bytes, "fresh_bytes": row.fresh_bytes,
                      "peak_bytes": row.peak_bytes}
                     for row in rows]}


def run_decode(args: argparse.Namespace, model: GPT2) -> dict:
    config = model.config
    if args.prompt_len + args.new_tokens > config.n_ctx:
        raise SystemExit(f"error: --prompt-len {args.prompt_len} + --new-tokens "
                         f"{args.new_tokens} exceed the context of {config.n_ctx}")
    if args.compare_dtype == args.dtype:
        raise SystemExit(f"error: --compare-dtype {args.compare_dtype} is already --dtype")
    if args.quantize:
        try:  # the text first: a bad path fails before minutes of timing
            quality_tokens = decode.quality_tokens(args.quality_data, config)
        except (ValueError, OSError) as error:
            raise SystemExit(f"error: {error}") from None
    # Each kind of model decoded, by the suffix of its rows' names: the weights rounded to
    # another dtype, or quantized.
    kinds = {"": model}
    if args.compare_dtype:
        kinds[f", {args.compare_dtype}"] = copy.deepcopy(model).to(DTYPES[args.compare_dtype])
    for scheme in args.quantize:
        kinds[f", {scheme}"] = quantize(copy.deepcopy(model), scheme)
    # The model as loaded decodes at every batch asked for; the others at batch 1.
    batches = {suffix: args.batch if not suffix else [1] for suffix in kinds}
    plans = {}
    if args.tune:
        print("tuning a plan for each kind of model and batch...", flush=True)
        for suffix, kind in kinds.items():
            for rows in batches[suffix]:
                plan = plans[(suffix, rows)] = tune(kind, batch=rows, seq=args.prompt_len)
                print(plan.describe(), flush=True)
    ways = []
    for suffix, kind in kinds.items():
        ways += decode.ways_of_decoding(
            kind, suffix=suffix, reference=not suffix, eager=not suffix, batches=batches[suffix],
            plans={rows: plan for (of, rows), plan in plans.items() if of == suffix})
    gguf_files = tempfile.TemporaryDirectory()  # llama.cpp's copies of the weights, until the end
    if args.compare:
        ways += decode.llama_cpp_ways(model, gguf_files.name, q8_0=bool(args.quantize),
                                      prompt_tokens=args.prompt_len)
    print(f"{describe(model)}, {model.dtype} on {model.device}, {args.prompt_len} + "
          f"{args.new_tokens} greedy tokens")
    prompt = random_tokens(config.vocab_size, 1, args.prompt_len, model.device, args.seed)
    bandwidth = ReadBandwidth(model.device)
    with gguf_files:
        rows = decode.time_ways(ways, prompt, args.new_tokens, args.warmup, args.runs, bandwidth)
    print("\n" + decode.format_table(rows))
    ratios = speed_ratios(rows, args, kinds)
    for line in ratios["lines"]:
        print(line)
    quality = {}
    for scheme in args.quantize:
        found = quality[scheme] = decode.quantization_quality(model, kinds[f", {scheme}"],
                                                              quality_tokens)
        print(f"{scheme} against {args.dtype} on {found.tokens:,} tokens of {args.quality_data}: "
              f"top-1 agreement {found.top1:.2%}, loss {found.loss:.4f} against "
              f"{found.reference_loss:.4f} ({found.loss_increase:+.4f})")
    return {"checkpoint": args.checkpoint, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "quantize": args.quantize,
            "compare_dtype": args.compare_dtype, "rows": rows,
            "quality": {scheme: dataclasses.asdict(found) for scheme, found in quality.items()},
            "plans": {f"{suffix.removeprefix(', ') or args.dtype}, batch {rows}": plan.to_dict()
                      for (suffix, rows), plan in plans.items()},
            "speed_ratios": ratios["figures"]}


def speed_ratios(rows: list[dict], args: argparse.Namespace, kinds: dict) -> dict:
    """The ratios the decode bench reports, turn by turn: each kind of model over the first,
    each batch over batch 1, tuned over plain, and ours over llama.cpp's file of its kind."""
    figures, lines = {}, []

    def add(label: str, name: str, other: str, key: str = "run_tokens_per_s") -> None:
        ratio = decode.ratio_by_name(rows, name, other, key)
        if ratio is not None:
            figures[label] = ratio
            lines.append(f"{label}: {ratio:.2f}x (median over turns)")

    variants = ["compiled, cache"] + (["compiled, cache, tuned"] if args.tune else [])
    for variant in variants:
        for suffix in kinds:
            if suffix:
                label = f"{variant}{suffix} / {args.dtype}"
                add(label, variant + suffix, variant)
                if figures.get(label, 1.0) < 1.0:
                    lines.append(f"note: on this CPU, {variant}{suffix} decodes slower than the "
                                 f"{args.dtype} model it came from ({figures[label]:.2f}x)")
        for batch in args.batch:
            if batch > 1:
                add(f"{variant}, batch {batch} / batch 1", f"{variant}, batch {batch}", variant)
                add(f"{variant}, batch {batch} / batch 1, after the first token",
                    f"{variant}, batch {batch}", variant, "run_after_first_tokens_per_s")
    for suffix in kinds:
        if args.tune:
            add(f"tuned / plain{suffix or ', ' + args.dtype}", f"compiled, cache, tuned{suffix}",
                f"compiled, cache{suffix}")
    ours = {args.dtype: "", args.compare_dtype: f", {args.compare_dtype}",
            **{scheme: f", {scheme}" for scheme in args.quantize}}
    for file_type, kind in LLAMA_PAIRS:
        if kind in ours:
            best = variants[-1]
            add(f"{best}{ours[kind] or ', ' + kind} / llama.cpp {file_type}", best + ours[kind],
                f"llama.cpp {file_type}")
    return {"figures": figures, "lines": lines}


def describe(model: GPT2) -> str:
    config = model.config
    return f"GPT-2 n_layer={config.n_layer} n_head={config.n_head} d_model={config.d_model}"


def plot(rows: list[forward.ForwardRow], path: Path, title: str) -> None:
    """Milliseconds against sequence length, eager beside compiled, with min-max bars (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    seqs = [row.seq for row in rows]
    for label in ("eager", "compiled"):
        timings = [row.timings[label] for row in rows]
        errors = [[t.median_ms - t.min_ms for t in timings],
                  [t.max_ms - t.median_ms for t in timings]]
        axes.errorbar(seqs, [t.median_ms for t in timings], yerr=errors, marker="o", capsize=3,
                      label=label)
    axes.set(xlabel="sequence length (tokens)", ylabel="forward pass, ms", yscale="log",
             title=title)
    axes.set_xscale("log", base=2)
    axes.set_xticks(seqs, [str(seq) for seq in seqs])
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
