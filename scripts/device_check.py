"""The benchmarks of the device check, each measured side by side in one run: forward passes
against our eager model, transformers compiled and a matmul roofline; a compiled training step
(MFU); batch-1 decoding against transformers' `generate` and the memory bound; batch-64
decoding; capturing activations against the plain forward and TransformerLens (where its wheel
was carried). Written as JSON and Markdown into --out; the short table is printed last.

    python scripts/device_check.py --out DIR            # on a GPU: GPT-2 small, full sizes
    python scripts/device_check.py --device cpu --out DIR   # tiny sizes, to prove it runs

Run by scripts/device_check.sh, which installs what is missing and runs the cuda tests first.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

import gpt2_decl
from gpt2_decl.bench import capture as bench_capture
from gpt2_decl.bench.decode import weight_bytes_per_token
from gpt2_decl.bench.measure import environment, random_tokens
from gpt2_decl.core.counting import forward_flops, training_flops_per_token
from gpt2_decl.core.devices import (
    ROOFLINE_PRODUCTS,
    matmul_roofline,
    resolve_device,
    roofline_products,
    synchronize,
)
from gpt2_decl.core.timing import time_in_turns
from gpt2_decl.text.generation import stream
from gpt2_decl.training.evaluation import next_token_loss


@dataclass(frozen=True)
class Sizes:
    """What each benchmark runs: the full sizes on a GPU, tiny ones to check the script on a CPU."""

    config: gpt2_decl.GPT2Config
    forward: tuple[int, int]  # batch, seq
    train: tuple[int, int]
    prompt: int
    new_tokens: int
    decode_batch: int
    matmul: int
    runs: int


FULL = Sizes(gpt2_decl.GPT2Config.from_preset("small"), (8, 1024), (16, 1024), 32, 128, 64, 8192,
             10)
TINY = Sizes(gpt2_decl.GPT2Config(n_layer=2, n_head=4, d_model=128, n_ctx=128), (2, 64),
             (2, 64), 8, 16, 4, 512, 3)
# The targets each figure is compared with (on a GPU).
TARGETS = {"forward_roofline_fraction": 0.5, "forward_over_eager": 1.3,
           "forward_over_transformers": 1.2, "training_mfu": 0.45, "decode_tokens_per_s": 1000,
           "decode_over_transformers": 10.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda (default where there is one) or cpu")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "device_check"),
                        help="where the JSON and Markdown go (default: $OUT, else ./device_check)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the default on a CPU)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no further benchmark after this many seconds")
    parser.add_argument("--tests", default="not run", help="what the cuda tests gave")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"which benchmarks, comma-separated (default: {','.join(PARTS)})")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        raise SystemExit(f"error: --device: {error}") from None
    sizes = TINY if args.tiny or device.type != "cuda" else FULL
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 parts
    args.out.mkdir(parents=True, exist_ok=True)
    report = {**environment(device, dtype), "sizes": repr(sizes), "targets": TARGETS,
              "cuda_tests": args.tests.strip()}
    started = time.perf_counter()
    model = gpt2_decl.GPT2(sizes.config).to(device)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        raise SystemExit(f"error: --parts: unknown {', '.join(sorted(unknown))}; expected some "
                         f"of {', '.join(PARTS)}")
    for name in args.parts.split(","):
        bench = PARTS[name]
        print(f"--- {name}", flush=True)
        if time.perf_counter() - started > args.budget_s:
            report[name] = {"skipped": f"over the time budget of {args.budget_s:.0f} s"}
        else:
            try:
                report[name] = bench(model, sizes, dtype)
            except Exception as error:  # one failing part must not cost the others' figures
                report[name] = {"error": f"{type(error).__name__}: {error}"}
                traceback.print_exc()
        print(json.dumps(report[name], indent=1), flush=True)
        torch._dynamo.reset()
        report["seconds"] = time.perf_counter() - started
        write(report, args.out)  # after each part, so a run cut short keeps what it measured
    print(markdown(report))
    return 0 if all("error" not in part for part in report.values()
                    if isinstance(part, dict)) else 1


def write(report: dict, out: Path) -> None:
    (out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "device_check.md").write_text(markdown(report) + "\n")


def transformers_model(model: gpt2_decl.GPT2, dtype: torch.dtype):
    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        reference = GPT2LMHeadModel.from_pretrained(directory, dtype=dtype,
                                                    attn_implementation="sdpa")
    reference = reference.to(model.device).eval()
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    return reference


@torch.no_grad()
def forward(model: gpt2_decl.GPT2, sizes: Sizes, dtype: torch.dtype) -> dict:
    """Ours compiled against ours eager, transformers compiled (SDPA) and a square matmul, in
    turns; each one's share of the matmul's FLOP/s."""
    device, (batch, seq) = model.device, sizes.forward
    ours = gpt2_decl.GPT2(model.config).to(device=device, dtype=dtype).eval()
    ours.load_state_dict(model.state_dict())
    compiled = gpt2_decl.compile(ours)
    reference = transformers_model(ours, dtype)
    compiled_reference = torch.compile(reference)
    tokens = random_tokens(model.config.vocab_size, batch, seq, device, 0)
    start = time.perf_counter()
    compiled(tokens)
    synchronize(device)
    compile_s = time.perf_counter() - start
    difference = (compiled(tokens).float() - ours(tokens).float()).abs().max().item()
    reference_difference = (compiled_reference(tokens).logits.float()
                            - ours(tokens).float()).abs().max().item()
    a, b = (torch.randn(sizes.matmul, sizes.matmul, device=device, dtype=dtype) for _ in range(2))
    product = torch.empty_like(a)
    runs = {
        "compiled": lambda: compiled(tokens), "eager": lambda: ours(tokens),
        "transformers_compiled": lambda: compiled_reference(tokens).logits,
        "matmul": lambda: roofline_products(a, b, product),
    }
    compile_s_of = {}
    # Weight freezing, for comparison (max-autotune was slower on an H200 and took 131 s).
    if device.type == "cuda":
        for name, settings in (("frozen", dict(freeze=True)),):
            variant = gpt2_decl.compile(ours, **settings)
            start = time.perf_counter()
            variant(tokens)
            synchronize(device)
            compile_s_of[name] = time.perf_counter() - start
            print(f"compiled ({name}) in {compile_s_of[name]:.1f} s", flush=True)
            runs[f"compiled_{name}"] = lambda variant=variant: variant(tokens)
    timings = time_in_turns(runs, device, runs=sizes.runs, warmup=2)
    flops = forward_flops(model.config, batch, seq)
    roofline = 2 * sizes.matmul**3 * ROOFLINE_PRODUCTS / (timings["matmul"].median_ms / 1e3)

    def achieved(name: str) -> float:
        return flops / (timings[name].median_ms / 1e3)

    return {
        "batch": batch, "seq": seq, "dtype": str(dtype), "compile_s": compile_s,
        **{f"compile_s_{name}": seconds for name, seconds in compile_s_of.items()},
        **{f"{name}_ms": timing.median_ms for name, timing in timings.items()},
        "roofline_tflops": roofline / 1e12,
        "roofline_fraction": achieved("compiled") / roofline,
        "transformers_roofline_fraction": achieved("transformers_compiled") / roofline,
        "over_eager": timings["eager"].median_ms / timings["compiled"].median_ms,
        "over_transformers": timings["transformers_compiled"].median_ms
        / timings["compiled"].median_ms,
        "max_abs_diff_vs_eager": difference, "max_abs_diff_vs_transformers": reference_difference,
    }


def training(model: gpt2_decl.GPT2, sizes: Sizes, dtype: torch.dtype) -> dict:
    """Compiled training steps (bf16 autocast on a GPU, fused AdamW): tokens/s and MFU against
    the matmul roofline measured here; whether a step ever waits for the device."""
    device, (batch, seq) = model.device, sizes.train
    trained = gpt2_decl.GPT2(model.config).to(device).train()
    compiled = gpt2_decl.compile(trained)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = random_tokens(model.config.vocab_size, batch, seq + 1, device, 1)
    inputs, targets = data[:, :-1], data[:, 1:]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    # The loss compiled apart from the model, as the trainer computes it; for comparison, eager.
    compiled_loss = torch.compile(next_token_loss, fullgraph=True)

    def step(loss_fn=compiled_loss) -> torch.Tensor:
        with autocast:
            loss = loss_fn(compiled(inputs, check_values=False), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    losses = [step() for _ in range(3)]  # compiles, and warms up
    step(next_token_loss)
    synchronize(device)
    sync_free = without_host_sync(device, step)
    timings = time_in_turns({"step": step, "eager_loss": lambda: step(next_token_loss)},
                               device, runs=sizes.runs, warmup=0)
    timing = timings["step"]
    tokens_per_s = batch * seq / (timing.median_ms / 1e3)
    roofline = matmul_roofline(device, dtype, size=sizes.matmul, runs=sizes.runs)
    flops = training_flops_per_token(model.config, seq)
    return {
        "batch": batch, "seq": seq, "step_ms": timing.median_ms, "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops / roofline, "roofline_tflops": roofline / 1e12,
        "step_ms_with_eager_loss": timings["eager_loss"].median_ms,
        "first_losses": [float(loss) for loss in losses], "sync_free": sync_free,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda" else None,
    }


def without_host_sync(device: torch.device, fn) -> bool | str:
    """Whether `fn` runs without waiting for the device (CUDA's sync debug mode)."""
    if device.type != "cuda":
        return "not checked off CUDA"
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError as error:
        return f"no: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def copy_bandwidth(device: torch.device, runs: int) -> float:
    """Bytes/s of a large device-to-device copy, reads and writes both counted."""
    source = torch.ones(2**28 if device.type == "cuda" else 2**24, dtype=torch.uint8,
                        device=device)
    target = torch.empty_like(source)
    timing = time_in_turns({"copy": lambda: target.copy_(source)}, device, runs=runs,
                              warmup=2)["copy"]
    return 2 * source.numel() / (timing.median_ms / 1e3)


@torch.no_grad()
def decode(model: gpt2_decl.GPT2, sizes: Sizes, dtype: torch.dtype) -> dict:
    """Batch-1 greedy decoding: ours compiled (a CUDA-graph step on a GPU) against
    transformers' `generate` on the same weights, in turns; the same tokens; the share of the
    memory bound (weights read per token over the copy bandwidth)."""
    device = model.device
    ours = gpt2_decl.GPT2(model.config).to(device=device, dtype=dtype).eval()
    ours.load_state_dict(model.state_dict())
    reference = transformers_model(ours, dtype)
    prompt = random_tokens(model.config.vocab_size, 1, sizes.prompt, device, 2)
    new = sizes.new_tokens

    def ours_generate() -> torch.Tensor:
        return ours.generate(prompt, new, greedy=True, compile=True)

    def reference_generate() -> torch.Tensor:
        return reference.generate(prompt, attention_mask=torch.ones_like(prompt),
                                  max_new_tokens=new, do_sample=False)

    start = time.perf_counter()
    ours_generate()
    ours_generate()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    same = same_greedy_tokens(model, prompt, new)
    steps = stream(ours, prompt, new, greedy=True, compile=True)
    next(steps), next(steps)  # the prompt's pass and the first step: checks and compiling
    sync_free = without_host_sync(device, lambda: [next(steps) for _ in range(new - 4)])
    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    timings = time_in_turns({"ours": ours_generate, "transformers": reference_generate},
                               device, runs=max(3, sizes.runs // 2), warmup=1)
    same_in_dtype = torch.equal(ours_generate(), reference_generate())
    grown = (torch.cuda.memory_allocated(device) - allocated) if allocated is not None else None
    weight_bytes = weight_bytes_per_token(ours)
    rate = {name: new / (timing.median_ms / 1e3) for name, timing in timings.items()}
    bandwidth = copy_bandwidth(device, 5)
    return {
        "prompt": sizes.prompt, "new_tokens": new, "dtype": str(dtype), "warmup_s": warmup_s,
        "tokens_per_s": rate["ours"], "transformers_tokens_per_s": rate["transformers"],
        "over_transformers": rate["ours"] / rate["transformers"], "same_tokens": same,
        "same_tokens_in_dtype": same_in_dtype,
        "copy_bandwidth_gb_s": bandwidth / 1e9, "weight_bytes_per_token": weight_bytes,
        "bound_fraction": rate["ours"] * weight_bytes / bandwidth, "sync_free": sync_free,
        "memory_growth_bytes_over_runs": grown,
    }


def same_greedy_tokens(model: gpt2_decl.GPT2, prompt: torch.Tensor, new: int) -> bool:
    """Whether our greedy tokens (eager; the cuda tests check compiled against eager) equal
    transformers' on the same float32 weights (TF32 off): in bfloat16, near-ties between random
    weights' logits can make them part ways by chance."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        ours = gpt2_decl.GPT2(model.config).to(model.device).eval()
        ours.load_state_dict(model.state_dict())
        reference = transformers_model(ours, torch.float32)
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      max_new_tokens=new, do_sample=False)
        return torch.equal(ours.generate(prompt, new, greedy=True), expected)
    finally:
        torch.set_float32_matmul_precision(before)


@torch.no_grad()
def decode_batch(model: gpt2_decl.GPT2, sizes: Sizes, dtype: torch.dtype) -> dict:
    """Decoding many rows at once: tokens/s of all rows together, against batch 1."""
    device = model.device
    ours = gpt2_decl.GPT2(model.config).to(device=device, dtype=dtype).eval()
    ours.load_state_dict(model.state_dict())
    rates = {}
    for batch in (1, sizes.decode_batch):
        prompt = random_tokens(model.config.vocab_size, batch, sizes.prompt, device, 3)
        ours.generate(prompt, sizes.new_tokens, greedy=True, compile=True)  # compile, warm up
        timing = time_in_turns(
            {"run": lambda prompt=prompt: ours.generate(prompt, sizes.new_tokens, greedy=True,
                                                        compile=True)},
            device, runs=3, warmup=0)["run"]
        rates[batch] = batch * sizes.new_tokens / (timing.median_ms / 1e3)
    return {"batch": sizes.decode_batch, "tokens_per_s": rates[sizes.decode_batch],
            "batch_1_tokens_per_s": rates[1], "speedup": rates[sizes.decode_batch] / rates[1]}


def ddp(model: gpt2_decl.GPT2, sizes: Sizes, dtype: torch.dtype) -> dict:
    """`torchrun` with two processes (NCCL, one GPU each) training a tiny model; the reason
    where it cannot run."""
    device = model.device
    if device.type != "cuda":
        return {"skipped": "off CUDA (the tests train with two processes over gloo on the CPU)"}
    gpus = torch.cuda.device_count()
    if gpus < 2:
        return {"skipped": f"{gpus} GPU: NCCL refuses two processes on one GPU ('invalid "
                           "usage', seen on an H200)"}
    with tempfile.TemporaryDirectory() as directory:
        text = Path(directory) / "text.txt"
        text.write_text("".join(f"Line {i}: {i} squared is {i * i}.\n" for i in range(400)))
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "gpt2_decl", "train", f"--data={text}", f"--out={directory}/run",
            f"--cache-dir={directory}/cache", "--device", "cuda",
            "--n-layer=2", "--n-head=4", "--d-model=128", "--n-ctx=64", "--batch-size=8",
            "--steps=20", "--eval-every=20", "--eval-batches=2", "--no-progress",
        ]
        start = time.perf_counter()
        try:
            finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return {"processes": 2, "gpus": gpus, "ran": False,
                    "why_not": "the two processes had not finished after 120 s (hung)"}
        seconds = time.perf_counter() - start
    lines = (finished.stdout + finished.stderr).strip().splitlines()
    result = {"processes": 2, "gpus": gpus, "seconds": seconds,
              "ran": finished.returncode == 0}
    if finished.returncode == 0:
        result["report"] = [line for line in lines if "trained" in line][-1:]
    else:
        # The first worker's own error, not torchrun's summary of it.
        errors = [line.strip() for line in lines if ("Error" in line or "error:" in line)
                  and "elastic" not in line and "ChildFailedError" not in line]
        result["why_not"] = (errors or lines or ["no output"])[0][:300]
        result["output_tail"] = lines[-40:]
    return result


@torch.no_grad()
def capture(model: gpt2_decl.GPT2, sizes: Sizes, dtype: torch.dtype) -> dict:
    """Capturing activations, compiled, beside the plain compiled forward, at the forward
    part's sizes; and TransformerLens' run_with_cache on the same weights where installed."""
    batch, seq = sizes.forward
    setup = bench_capture.Setup(model.config, dtype, str(model.device), batch, seq)
    # The ways compile side by side (on the CPU too, where this runs at tiny sizes).
    rows = bench_capture.benchmark_capture(
        setup, runs=sizes.runs, warmup=2, compare_lens=bench_capture.transformer_lens_installed(),
        together=True)
    print(bench_capture.format_table(rows))
    result = {"batch": batch, "seq": seq,
              **{f"{row.name} ms": row.timing.median_ms for row in rows},
              **{f"{row.name} peak MB": None if row.peak_bytes is None else
                 row.peak_bytes / 2**20 for row in rows}}
    for way in ("resid_post", "all but patterns", "everything"):
        result[f"{way} over plain"] = 1 / bench_capture.turn_ratio(rows, f"compiled, {way}",
                                                                   "compiled, plain")
    result["over TransformerLens"] = bench_capture.turn_ratio(rows, "compiled, everything",
                                                              "TransformerLens, everything")
    return result


def markdown(report: dict) -> str:
    """The short table: each figure beside its target."""
    rows = [("| figure | measured | target on a GPU |", "|---|---|---|")]
    f, t, d, b = (report.get(name, {}) for name in ("forward", "training", "decode",
                                                    "decode_batch"))

    def row(name: str, value: object, target: str = "") -> None:
        if isinstance(value, float):
            value = f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        rows.append((f"| {name} | {value} | {target} |",))

    for part, figures in (("forward", f), ("training", t), ("decode", d), ("batch decode", b),
                          ("capture", report.get("capture", {})), ("ddp", report.get("ddp", {}))):
        for problem in ("error", "skipped"):
            if problem in figures:
                row(part, f"{problem}: {figures[problem][:80]}")
    row("cuda tests", report.get("cuda_tests"), "all pass")
    row("forward, compiled, share of the matmul roofline", f.get("roofline_fraction"), ">= 0.5")
    row("forward, compiled over eager", f.get("over_eager"), ">= 1.3x")
    row("forward, compiled over transformers compiled (SDPA)", f.get("over_transformers"),
        ">= 1.2x")
    for variant, label in (("frozen", "weights frozen"),):
        if f"compiled_{variant}_ms" in f:
            row(f"forward, compiled ({label}) over transformers compiled",
                f["transformers_compiled_ms"] / f[f"compiled_{variant}_ms"])
    row("training step, MFU", t.get("mfu"), ">= 0.45")
    row("training, tokens/s", t.get("tokens_per_s"))
    row("training step without host syncs", t.get("sync_free"), "True")
    row("decoding batch 1, tokens/s", d.get("tokens_per_s"), ">= 1,000")
    row("decoding over transformers generate", d.get("over_transformers"), ">= 10x")
    row("decoding, same tokens as transformers", d.get("same_tokens"), "True")
    row("decoding, share of the memory bound", d.get("bound_fraction"))
    row("decoding without host syncs", d.get("sync_free"), "True")
    row(f"decoding batch {b.get('batch')}, tokens/s", b.get("tokens_per_s"))
    c = report.get("capture", {})
    row("capture of every resid_post, over the plain compiled forward",
        c.get("resid_post over plain"), "<= 1.05x")
    row("capture of every name but patterns, over plain", c.get("all but patterns over plain"),
        "<= 1.3x")
    row("capture of everything, over plain", c.get("everything over plain"), "<= 1.6x")
    row("compiled capture of everything over TransformerLens", c.get("over TransformerLens"),
        ">= 5x")
    ddp_part = report.get("ddp", {})
    if "ran" in ddp_part:
        row("torchrun, 2 processes (NCCL)", "ran" if ddp_part["ran"] else
            f"did not run: {ddp_part['why_not'][:100]}")
    head = (f"Device check: {report['device_name']} ({report['device']}), torch "
            f"{report['torch']}, {report['date']}, {report.get('seconds', 0):.0f} s")
    return "\n".join([head, "", *(line for group in rows for line in group)])


PARTS = {"forward": forward, "training": training, "decode": decode,
         "decode_batch": decode_batch, "capture": capture, "ddp": ddp}

if __name__ == "__main__":
    sys.exit(main())
