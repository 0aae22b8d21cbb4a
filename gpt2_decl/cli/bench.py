"""`gpt2-decl bench`: compiled vs eager forward passes over sequence lengths, or, with
`--generate`, decoding speed against the memory bound."""

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

from gpt2_decl.bench import decode, forward
from gpt2_decl.bench.measure import ReadBandwidth, environment, random_tokens, transformers_copy
from gpt2_decl.cli import common
from gpt2_decl.core.config import DTYPES, GPT2Config
from gpt2_decl.core.model import GPT2
from gpt2_decl.core.typecheck import is_typechecked, set_typechecked
from gpt2_decl.speedups import (
    causal_attention,
    freed_memory,
    huge_pages,
    row_blocks,
    row_kernels,
    sigmoid_gelu,
    wide_products,
)
from gpt2_decl.speedups.causal_attention import KernelAttention
from gpt2_decl.speedups.cpu_decoding import choice_for
from gpt2_decl.speedups.quantize import SCHEMES, quantize
from gpt2_decl.speedups.row_blocks import RowBlocks
from gpt2_decl.speedups.sigmoid_gelu import SigmoidGelu
from gpt2_decl.speedups.wide_products import WideProducts

SIZE_OVERRIDES = ("n_layer", "n_head", "d_model")
STDLIB_JSON = Path(sysconfig.get_paths()["stdlib"]) / "json"
# torch.compile's modes (named here: asking inductor for them would import it, for seconds).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="time compiled vs eager forward passes (or decoding, with --generate)",
        description="Eager against compiled forward passes at each sequence length; with "
        "--generate, decoding tokens/s against the memory bound. See the README's method.")
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
                        help="torch.compile mode (default: default)")
    parser.add_argument("--freeze", action=argparse.BooleanOptionalAction, default=True,
                        help="inductor weight freezing (pre-packed weights; default: on)")
    parser.add_argument("--wide-products", action=argparse.BooleanOptionalAction, default=True,
                        help="on a CPU, compile bfloat16 products of many rows in float32 where "
                        "timed faster (speedups.wide_products; default: on)")
    parser.add_argument("--row-blocks", action=argparse.BooleanOptionalAction, default=True,
                        help="on a CPU, compile products of many rows a block of rows at a "
                        "time where timed faster (speedups.row_blocks; default: on)")
    parser.add_argument("--kernel-attention", action=argparse.BooleanOptionalAction,
                        default=True, help="on a CPU, compile causal attention through the C++ "
                        "kernel where timed faster (speedups.causal_attention; default: on)")
    parser.add_argument("--sigmoid-gelu", action=argparse.BooleanOptionalAction, default=True,
                        help="on a CPU, compile GELU through a sigmoid where timed faster "
                        "(speedups.sigmoid_gelu; default: on)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="first have malloc keep large freed buffers for reuse, for the "
                        "whole process: every model timed (speedups.freed_memory)")
    parser.add_argument("--compare", choices=["llama.cpp", "transformers"],
                        help="forward passes: also transformers' model compiled, on the same "
                        "weights; decoding: also llama.cpp on the same weights, F32 and BF16, "
                        "and Q8_0 with --quantize (needs llama-cpp-python and gguf)")
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
                          help="also decode with the cache in this dtype, in turns")
    decoding.add_argument("--huge-pages", action="store_true",
                          help="move the weights into transparent huge pages first (CPU)")
    decoding.add_argument("--quantize", type=schemes, default=[], metavar="SCHEMES",
                          help=f"also decode quantized copies ({', '.join(SCHEMES)}; a list: "
                          "int8,int8-dynamic) in turns, and measure their agreement with the "
                          "model on --quality-data")
    decoding.add_argument("--quality-data", type=Path, default=STDLIB_JSON, metavar="PATH",
                          help="text for --quantize's agreement (default: the standard "
                          "library's json package sources)")
    parser.set_defaults(handler=run)


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
    if args.threads:
        if args.threads > (os.cpu_count() or args.threads):
            print(f"warning: --threads {args.threads} is more than this machine's "
                  f"{os.cpu_count()} CPUs: the threads will share cores", file=sys.stderr)
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    kept = args.keep_freed_memory and freed_memory.keep_freed_memory()
    if args.keep_freed_memory and not kept:
        print("warning: --keep-freed-memory: this C library's malloc is not glibc's; nothing "
              "changed", file=sys.stderr)
    model = load_model(args, device, dtype)
    report = {**environment(device, dtype), "config": dataclasses.asdict(model.config),
              "keep_freed_memory": kept}
    sizes = (f"decoding {args.prompt_len} + {args.new_tokens} tokens" if args.generate
             else f"with batch {args.batch[0]} at sequence lengths {args.seq}")
    with common.explained_out_of_memory(device, sizes):
        report |= run_decode(args, model) if args.generate else run_forward(args, model)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> GPT2:
    if args.checkpoint:
        if not args.generate:
            raise SystemExit("error: --checkpoint is for --generate (weights do not change speed)")
        return GPT2.from_pretrained(args.checkpoint, dtype=dtype, device=device)
    overrides = {name: getattr(args, name) for name in SIZE_OVERRIDES if getattr(args, name)}
    config = GPT2Config.from_preset(args.preset, seed=args.seed, **overrides)
    return GPT2(config).to(device=device, dtype=dtype).eval()


def run_forward(args: argparse.Namespace, model: GPT2) -> dict:
    too_long = [seq for seq in args.seq if seq > model.config.n_ctx]
    if too_long:
        raise SystemExit(f"error: --seq {too_long} longer than the context of {model.config.n_ctx}")
    batch = args.batch[0]
    print(f"{describe(model)}, batch {batch}, {model.dtype} on {model.device}")
    widening = args.wide_products and model.device.type == "cpu"
    blocking = args.row_blocks and model.device.type == "cpu"
    attending = args.kernel_attention and model.device.type == "cpu"
    gelu = args.sigmoid_gelu and model.device.type == "cpu"
    # Products widened first: the blocks take those left as they were.
    backend = RowBlocks(mode=args.mode) if blocking else None
    if widening:
        backend = WideProducts(then=backend, mode=args.mode)
    if attending:
        backend = KernelAttention(then=backend, mode=args.mode)
    if gelu:
        backend = SigmoidGelu(then=backend, mode=args.mode)
    reference = transformers_copy(model) if args.compare == "transformers" else None
    rows = list(forward.benchmark_forward(
        model, args.seq, batch=batch, runs=args.runs, warmup=args.warmup, mode=args.mode,
        freeze=args.freeze, backend=backend or "inductor",
        typecheck_overhead=args.typecheck_overhead, reference=reference, seed=args.seed,
        log=lambda message: print(message, flush=True)))
    print("\n" + forward.format_table(rows))
    # This run's products (a process may have timed others before).
    widened = {shape: times for shape, times in wide_products.timings().items()
               if widening and shape[0] in {batch * seq for seq in args.seq}
               and shape[3] == model.dtype}
    if widened:
        print("bfloat16 products of many rows in float32 where timed faster (rows x in x out):")
        print("  " + wide_products.describe(widened).replace("\n", "\n  "))
    blocked = {key: times for key, times in row_blocks.timings().items()
               if blocking and key[0] in {batch * seq for seq in args.seq}
               and key[4] == model.dtype and key[5] == args.freeze}
    if blocking:
        print("products of many rows in blocks of rows where timed faster (rows x in x out x "
              "block):")
        print("  " + row_blocks.describe(blocked).replace("\n", "\n  "))
    attended = {shape: times for shape, times in causal_attention.timings().items()
                if attending and shape[:3] in {(batch, model.config.n_head, seq)
                                               for seq in args.seq} and shape[4] == model.dtype}
    if attending:
        print("causal attention through the C++ kernel where timed faster (batch x heads x seq x "
              "d_head):")
        print("  " + (causal_attention.describe(attended) if attended else
                      f"none timed ({row_kernels.load() or 'no shape the kernel does'})"
                      ).replace("\n", "\n  "))
    gelus = {key: times for key, times in sigmoid_gelu.timings().items()
             if gelu and key[-2] == model.dtype}
    if gelu:
        print("GELU through a sigmoid where timed faster (elements timed):")
        print("  " + sigmoid_gelu.describe(gelus))
    if args.plot:
        plot(rows, args.plot, title=f"{describe(model)}, batch {batch}, {model.dtype}")
    return {"preset": args.preset, "batch": batch, "compile_mode": args.mode,
            "freeze": args.freeze, "rows": [row.to_dict() for row in rows],
            "wide_products": [{"rows": shape[0], "in_features": shape[1],
                               "out_features_timed": shape[2], "dtype": str(shape[3]),
                               "widened_ms": wide, "library_ms": library,
                               "widened": wide < library}
                              for shape, (wide, library) in widened.items()],
            "row_blocks": [{"rows": key[0], "in_features": key[1],
                            "out_features_timed": key[2], "block": key[3],
                            "dtype": str(key[4]), "blocks_ms": blocks, "whole_ms": whole,
                            "faster": blocks < whole}
                           for key, (blocks, whole) in blocked.items()],
            "kernel_attention": [{"batch": shape[0], "heads": shape[1], "seq": shape[2],
                                  "d_head": shape[3], "dtype": str(shape[4]),
                                  "kernel_ms": kernel, "library_ms": library,
                                  "used": kernel < library}
                                 for shape, (kernel, library) in attended.items()],
            "sigmoid_gelu": [{"dtype": str(key[-2]), "sigmoid_ms": ours, "tanh_ms": tanh,
                              "used": ours < tanh}
                             for key, (ours, tanh) in gelus.items()],
            "roofline_flops_per_s": statistics.median(r.roofline_flops_per_s for r in rows)}


def run_decode(args: argparse.Namespace, model: GPT2) -> dict:
    config = model.config
    if args.prompt_len + args.new_tokens > config.n_ctx:
        raise SystemExit(f"error: --prompt-len {args.prompt_len} + --new-tokens "
                         f"{args.new_tokens} exceed the context of {config.n_ctx}")
    if args.compare_dtype == args.dtype:
        raise SystemExit(f"error: --compare-dtype {args.compare_dtype} is already --dtype")
    if args.huge_pages and not huge_pages.available():  # a clear error, before any work
        raise SystemExit("error: --huge-pages: this system gives no transparent huge pages")
    on_huge_pages = args.huge_pages and model.device.type == "cpu"
    ways = decode.ways_of_decoding(model, huge_pages=on_huge_pages, batches=args.batch)
    if args.compare_dtype:
        other = copy.deepcopy(model).to(DTYPES[args.compare_dtype])  # the same weights, rounded
        ways += decode.ways_of_decoding(other, suffix=f", {args.compare_dtype}", reference=False,
                                        huge_pages=on_huge_pages)
    if args.quantize:
        try:  # the text first: a bad path fails before minutes of timing
            quality_tokens = decode.quality_tokens(args.quality_data, config)
        except (ValueError, OSError) as error:
            raise SystemExit(f"error: {error}") from None
    quantized = {scheme: quantize(copy.deepcopy(model), scheme) for scheme in args.quantize}
    for scheme, copied in quantized.items():  # compiled only: eager int8 is slow on a CPU
        ways += decode.ways_of_decoding(copied, suffix=f", {scheme}", reference=False,
                                        eager=False, huge_pages=on_huge_pages)
    gguf_files = tempfile.TemporaryDirectory()  # llama.cpp's copies of the weights, until the end
    ways += decode.llama_cpp_ways(model, gguf_files.name, q8_0=bool(args.quantize),
                                  prompt_tokens=args.prompt_len) \
        if args.compare else []
    print(f"{describe(model)}, {model.dtype} on {model.device}, {args.prompt_len} + "
          f"{args.new_tokens} greedy tokens; huge pages: {on_huge_pages}")
    rewrites = {}
    if model.device.type == "cpu":  # measured before any timing, for each kind of model timed
        print("choosing the rewrites of compiled CPU decoding by timing them...", flush=True)
        timed = [(args.dtype, model)]
        timed += [(args.compare_dtype, other)] if args.compare_dtype else []
        timed += list(quantized.items())
        timed = [(name, kind, 1) for name, kind in timed]
        timed += [(f"{args.dtype}, batch {rows}", model, rows) for rows in args.batch if rows > 1]
        for name, kind, rows in timed:
            choice = choice_for(kind, rows)
            rewrites[name] = {"used": choice.decoding.names(), "times_ms": choice.times_ms,
                              "kernel_prefill_rows": choice.prefill_rows,
                              "wide_prefill_rows": choice.prefill_wide_rows,
                              "prefill_times_ms": choice.prefill_times_ms,
                              "kernel_prefill_attention_from": choice.prefill_attention_from,
                              "prefill_attention_times_ms": choice.prefill_attention_times_ms}
            print(f"  {name}: {choice.describe()}")
        if "int8" in rewrites:
            way = rewrites["int8"]["int8_products"] = row_kernels.int8_products_way()
            print(f"  int8 products in the kernel: {way} (digits: the input rows as int8 digits, "
                  "integer products; widened: the weights widened to float32)")
    prompt = random_tokens(config.vocab_size, 1, args.prompt_len, model.device, args.seed)
    bandwidth = ReadBandwidth(model.device, in_huge_pages=on_huge_pages)
    with gguf_files:
        rows = decode.time_ways(ways, prompt, args.new_tokens, args.warmup, args.runs, bandwidth)
    print("\n" + decode.format_table(rows))
    ratios = decode.speed_ratios(rows, f", {args.compare_dtype}") if args.compare_dtype else {}
    for name, ratio in ratios.items():
        print(f"{args.compare_dtype} / {args.dtype}, {name}: {ratio:.2f}x (median over turns)")
    floats = {args.dtype: ""} | (
        {args.compare_dtype: f", {args.compare_dtype}"} if args.compare_dtype else {})
    batch_ratios = decode.batch_speed_ratios(rows)
    for batch, ratio in batch_ratios.items():
        after = "-" if ratio["after_first"] is None else f"{ratio['after_first']:.2f}x"
        print(f"batch {batch} / batch 1, compiled, cache: {ratio['whole']:.2f}x whole runs, "
              f"{after} after the first token (median over turns)")
    quantized_ratios = decode.quantized_speed_ratios(rows, args.quantize, floats)
    for scheme, over in quantized_ratios.items():
        for dtype, ratio in over.items():
            print(f"{scheme} / {dtype}, compiled, cache: {ratio:.2f}x (median over turns)")
    quality = {}
    for scheme, copied in quantized.items():
        found = quality[scheme] = decode.quantization_quality(model, copied, quality_tokens)
        print(f"{scheme} against {args.dtype} on {found.tokens:,} tokens of {args.quality_data}: "
              f"top-1 agreement {found.top1:.2%}, loss {found.loss:.4f} against "
              f"{found.reference_loss:.4f} ({found.loss_increase:+.4f})")
    return {"checkpoint": args.checkpoint, "prompt_len": args.prompt_len,
            "quantize": args.quantize,
            "quality": {scheme: dataclasses.asdict(found) for scheme, found in quality.items()},
            "new_tokens": args.new_tokens, "huge_pages": on_huge_pages, "cpu_decoding": rewrites,
            "rows": rows, "compare_dtype": args.compare_dtype,
            "compare_dtype_speed_ratios": ratios, "quantized_speed_ratios": quantized_ratios,
            "batch_speed_ratios": batch_ratios}


def schemes(text: str) -> list[str]:
    """An argparse type: a comma-separated list of quantization schemes."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in SCHEMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected schemes among {', '.join(SCHEMES)}, got {text!r}")
    return list(dict.fromkeys(names))


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
