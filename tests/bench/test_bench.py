"""The benchmarks: the timing helper, and `gpt2-decl bench` (forward passes and decoding) end to
end on tiny models, its figures checked against each other and by hand."""

import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2_decl.bench import decode
from gpt2_decl.bench.measure import ReadBandwidth, Timing, time_interleaved
from gpt2_decl.cli import main
from gpt2_decl.speedups import (
    causal_attention,
    cpu_decoding,
    huge_pages,
    row_blocks,
    row_kernels,
    sigmoid_gelu,
    wide_products,
)

TINY_CLI = ["bench", "--n-layer", "2", "--d-model", "64", "--n-head", "4", "--threads", "1"]
TINY_DECODE = ["bench", "--generate", "--n-layer", "1", "--n-head", "2", "--d-model", "32",
               "--prompt-len", "4", "--new-tokens", "3", "--device", "cpu", "--threads", "1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The command sets torch's thread count for the whole process; later tests get it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_interleaved_timing_warms_up_then_times_each_function_in_turn():
    calls = []
    timings = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               torch.device("cpu"), runs=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert all(len(timing.times_ms) == 3 for timing in timings.values())
    timing = Timing((3.0, 1.0, 2.0))
    assert (timing.median_ms, timing.min_ms, timing.max_ms) == (2.0, 1.0, 3.0)


@pytest.mark.parametrize("runs, warmup", [(0, 1), (3, -1)])
def test_interleaved_timing_rejects_impossible_counts(runs, warmup):
    with pytest.raises(ValueError, match="runs"):
        time_interleaved({"f": lambda: None}, torch.device("cpu"), runs=runs, warmup=warmup)


def test_read_bandwidth_is_the_bytes_read_over_the_time():
    bandwidth = ReadBandwidth(torch.device("cpu"), n_bytes=2**20)
    assert bandwidth().item() == 2**18  # a sum of 2**18 float ones: every byte was read
    assert bandwidth.bytes_per_s(Timing((2.0,))) == pytest.approx(2**20 / 2e-3)
    if huge_pages.available():
        assert ReadBandwidth(torch.device("cpu"), in_huge_pages=True, n_bytes=2**21)().item() \
            == 2**19


def test_forward_bench_writes_json_with_every_figure_and_a_png(tmp_path, capsys):
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    main([*TINY_CLI, "--seq", "8,16", "--runs", "2", "--json", str(report_path),
          "--plot", str(plot_path)])
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["dtype"] == "float32" and report["device"] == "cpu"
    assert report["torch"] == torch.__version__ and report["threads"] == 1
    assert report["keep_freed_memory"] is False
    assert [row["seq"] for row in report["rows"]] == [8, 16]
    for row in report["rows"]:
        assert row["max_abs_diff"] < 1e-4
        for key in ("eager_ms", "compiled_ms", "compile_s", "tokens_per_s", "roofline_fraction",
                    "typechecked_eager_ms", "roofline_flops_per_s"):
            assert row[key] > 0, key
        assert row["speedup"] == pytest.approx(row["eager_ms"] / row["compiled_ms"])
        assert row["tokens_per_s"] == pytest.approx(row["seq"] / (row["compiled_ms"] / 1e3))
        assert row["roofline_fraction"] == pytest.approx(
            row["flops"] / (row["compiled_ms"] / 1e3) / row["roofline_flops_per_s"])
        assert row["typecheck_overhead"] == pytest.approx(
            row["typechecked_eager_ms"] / row["eager_ms"] - 1)
    assert "compiling (seq=8" in out and "compiling (seq=16" in out
    assert plot_path.read_bytes().startswith(PNG_SIGNATURE)


def test_forward_bench_compares_transformers_compiled_on_the_same_weights(tmp_path, capsys):
    pytest.importorskip("transformers")
    report_path = tmp_path / "bench.json"
    main([*TINY_CLI, "--seq", "8", "--runs", "2", "--compare", "transformers",
          "--no-typecheck-overhead", "--json", str(report_path)])
    [row] = json.loads(report_path.read_text())["rows"]
    assert row["max_abs_diff_vs_transformers"] < 1e-4  # the same weights, the same logits
    assert row["over_transformers"] == pytest.approx(
        row["transformers_compiled_ms"] / row["compiled_ms"])
    assert "over tf" in capsys.readouterr().out


def test_forward_bench_in_bfloat16_reports_each_product_widened_or_not(tmp_path, monkeypatch):
    monkeypatch.setattr(wide_products, "_times", {})
    report_path = tmp_path / "bench.json"
    main([*TINY_CLI, "--seq", "8", "--runs", "1", "--dtype", "bfloat16",
          "--no-typecheck-overhead", "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    # GPT-2's four product shapes in a block, and the output head's (timed on 4096 rows).
    shapes = {(entry["in_features"], entry["out_features_timed"])
              for entry in report["wide_products"]}
    assert shapes == {(64, 192), (64, 64), (64, 256), (256, 64), (64, 4096)}
    for entry in report["wide_products"]:
        assert entry["rows"] == 8 and entry["dtype"] == "torch.bfloat16"
        assert entry["widened"] == (entry["widened_ms"] < entry["library_ms"])
    assert report["rows"][0]["max_abs_diff"] < 0.05  # bfloat16 logits of about 1
    torch._dynamo.reset()
    main([*TINY_CLI, "--seq", "8", "--runs", "1", "--dtype", "bfloat16", "--no-wide-products",
          "--no-typecheck-overhead", "--json", str(report_path)])
    assert json.loads(report_path.read_text())["wide_products"] == []


@pytest.mark.skipif(row_kernels.load() is not None, reason="no C++ kernel here")
def test_forward_bench_reports_causal_attention_through_the_kernel_or_not(tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.setattr(causal_attention, "_times", {})
    report_path = tmp_path / "bench.json"
    main([*TINY_CLI, "--seq", "8,24", "--runs", "1", "--no-typecheck-overhead",
          "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    # batch 1, 4 heads of 64 / 4 = 16, at each length
    assert [(entry["batch"], entry["heads"], entry["seq"], entry["d_head"], entry["dtype"])
            for entry in report["kernel_attention"]] == [(1, 4, 8, 16, "torch.float32"),
                                                         (1, 4, 24, 16, "torch.float32")]
    for entry in report["kernel_attention"]:
        assert entry["used"] == (entry["kernel_ms"] < entry["library_ms"])
    assert "causal attention through the C++ kernel" in capsys.readouterr().out
    torch._dynamo.reset()
    main([*TINY_CLI, "--seq", "8", "--runs", "1", "--no-kernel-attention",
          "--no-typecheck-overhead", "--json", str(report_path)])
    assert json.loads(report_path.read_text())["kernel_attention"] == []


def test_forward_bench_reports_products_in_blocks_of_rows_or_not(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(row_blocks, "_times", {})
    monkeypatch.setattr(row_blocks, "BLOCK_ROWS", (4, 8))  # 8 rows make two blocks of 4
    report_path = tmp_path / "bench.json"
    main([*TINY_CLI, "--seq", "8", "--runs", "1", "--no-typecheck-overhead",
          "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    # GPT-2's four product shapes in a block, and the output head's (timed on 4096 rows).
    assert {(entry["rows"], entry["in_features"], entry["out_features_timed"], entry["block"])
            for entry in report["row_blocks"]} == {
        (8, 64, 192, 4), (8, 64, 64, 4), (8, 64, 256, 4), (8, 256, 64, 4), (8, 64, 4096, 4)}
    for entry in report["row_blocks"]:
        assert entry["faster"] == (entry["blocks_ms"] < entry["whole_ms"])
    assert "products of many rows in blocks of rows" in capsys.readouterr().out
    torch._dynamo.reset()
    main([*TINY_CLI, "--seq", "8", "--runs", "1", "--no-row-blocks",
          "--no-typecheck-overhead", "--json", str(report_path)])
    assert json.loads(report_path.read_text())["row_blocks"] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_forward_bench_keeps_freed_memory_when_asked(tmp_path):
    # In a process of its own: the setting is the whole process's.
    report_path = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "gpt2_decl", *TINY_CLI, "--seq", "8", "--runs", "1",
                    "--no-typecheck-overhead", "--no-row-blocks", "--no-kernel-attention",
                    "--no-sigmoid-gelu", "--keep-freed-memory", "--json", str(report_path)],
                   check=True, capture_output=True)
    report = json.loads(report_path.read_text())
    assert report["keep_freed_memory"] is True and report["rows"][0]["compiled_ms"] > 0


def test_forward_bench_reports_gelu_through_a_sigmoid_or_not(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sigmoid_gelu, "_times", {})
    report_path = tmp_path / "bench.json"
    main([*TINY_CLI, "--seq", "8", "--runs", "1", "--no-typecheck-overhead",
          "--json", str(report_path)])
    [entry] = json.loads(report_path.read_text())["sigmoid_gelu"]
    assert entry["dtype"] == "torch.float32"
    assert entry["used"] == (entry["sigmoid_ms"] < entry["tanh_ms"])
    assert "GELU through a sigmoid where timed faster" in capsys.readouterr().out
    torch._dynamo.reset()
    main([*TINY_CLI, "--seq", "8", "--runs", "1", "--no-sigmoid-gelu",
          "--no-typecheck-overhead", "--json", str(report_path)])
    assert json.loads(report_path.read_text())["sigmoid_gelu"] == []


@pytest.mark.parametrize(("arguments", "message"), [
    (["--seq", "8,x"], "comma-separated integers"),
    (["--compare", "llama.cpp"], "--compare llama.cpp is for --generate"),
    (["--generate", "--compare", "transformers"], "--compare transformers is for forward"),
    (["--seq", "0"], "positive"),
    (["--runs", "0"], "positive integer"),
    (["--d-model", "66"], "divisible by n_head"),
    (["--seq", "2048"], "longer than the context"),
    (["--checkpoint", "x"], "--checkpoint is for --generate"),
    (["--batch", "1,4"], "forward passes take one --batch"),
])
def test_forward_bench_rejects_bad_options_clearly(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY_CLI, *arguments])
    assert message in str(exit_info.value.code) + capsys.readouterr().err


def test_decode_bench_reports_every_way_of_decoding_against_its_bound(tmp_path, capsys,
                                                                     every_product_way):
    report_path = tmp_path / "decode.json"
    main([*TINY_DECODE, "--runs", "2", "--warmup", "0", "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["eager, cache", "compiled, cache", "transformers generate"]
    rewrites = report["cpu_decoding"]["float32"]  # chosen by timing each with and without
    assert "store_pointwise" in rewrites["used"]
    times = rewrites["times_ms"]
    loaded = row_kernels.load() is None
    ways = ["one_row_products", "packed_products", *(["kernel_products"] if loaded else [])]
    attention = ["one_query_attention", *(["kernel_attention"] if loaded else [])]
    assert set(times) == {*ways, *attention}
    # One way of doing the products, and one of attention, at most: the fastest, if it beats
    # the plain one.
    for timed, suffix in [(ways, "_products"), (attention, "_attention")]:
        fastest = min(timed, key=lambda name: times[name][0])
        used = [name for name in rewrites["used"] if name.endswith(suffix)]
        assert used == ([fastest] if times[fastest][0] < times[fastest][1] else [])
    # The prompt's products timed at every size (float32: through the kernel, where it loads,
    # against the library's), through the kernel up to the most rows it was fastest at
    # throughout; never widened (float32 weights are wide already).
    prefill = {int(rows): ways for rows, ways in rewrites["prefill_times_ms"].items()}
    assert list(prefill) == (list(cpu_decoding.PREFILL_ROWS) if loaded else [])
    assert all(set(ways) == {"kernel", "library"} for ways in prefill.values())
    kernel_rows = 0
    for rows, ways in prefill.items():
        if ways["kernel"] >= ways["library"]:
            break
        kernel_rows = rows
    assert rewrites["kernel_prefill_rows"] == kernel_rows and rewrites["wide_prefill_rows"] == 0
    # The prompt's attention, the kernel's against the library's, at the same sizes.
    attention = {int(seq): times for seq, times in rewrites["prefill_attention_times_ms"].items()}
    assert list(attention) == (list(cpu_decoding.PREFILL_ROWS) if loaded else [])
    assert all(len(times) == 2 and min(times) > 0 for times in attention.values())
    assert rewrites["kernel_prefill_attention_from"] in {0, 1, *attention}
    # Weights read per token by hand: token embedding 50257 x 32, one block, ln_f; float32.
    block = 2 * 32 + 32 * 96 + 96 + 32 * 32 + 32 + 2 * 32 + 32 * 128 + 128 + 128 * 32 + 32
    weight_bytes = 4 * (50257 * 32 + block + 2 * 32)
    for row in report["rows"]:
        assert row["same_tokens"], row["name"]  # transformers' tokens too: the same weights
        assert row["weight_bytes_per_token"] == weight_bytes
        assert len(row["run_tokens_per_s"]) == len(row["run_bound_fractions"]) == 2
        rates = row["run_tokens_per_s"]  # 3 tokens per run
        assert max(rates) == pytest.approx(3 / (row["min_ms"] / 1e3))
        assert min(rates) == pytest.approx(3 / (row["max_ms"] / 1e3))
        assert row["tokens_per_s"] == pytest.approx(statistics.median(rates))
        for rate, bound, fraction in zip(row["run_tokens_per_s"], row["run_bound_tokens_per_s"],
                                         row["run_bound_fractions"], strict=True):
            assert fraction == pytest.approx(rate / bound)
    assert "transformers generate" in capsys.readouterr().out


def test_decode_bench_compares_dtypes_turn_by_turn(tmp_path):
    report_path = tmp_path / "decode.json"
    main([*TINY_DECODE, "--runs", "2", "--warmup", "0", "--compare-dtype", "bfloat16",
          "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    for name in ("eager, cache", "compiled, cache"):
        ours, other = rows[name], rows[f"{name}, bfloat16"]
        assert other["weight_bytes_per_token"] * 2 == ours["weight_bytes_per_token"]
        turns = zip(other["run_tokens_per_s"], ours["run_tokens_per_s"], strict=True)
        assert report["compare_dtype_speed_ratios"][name] == pytest.approx(
            statistics.median(a / b for a, b in turns))


def test_speed_ratios_by_hand():
    rows = [{"name": "eager, cache", "run_tokens_per_s": [10, 20, 30]},
            {"name": "eager, cache, bf16", "run_tokens_per_s": [30, 20, 45]}]
    assert decode.speed_ratios(rows, ", bf16") == {"eager, cache": 1.5}


def test_quantized_speed_ratios_by_hand():
    rows = [{"name": "compiled, cache", "run_tokens_per_s": [10, 20, 40]},
            {"name": "compiled, cache, bf16", "run_tokens_per_s": [20, 30, 50]},
            {"name": "compiled, cache, int8", "run_tokens_per_s": [30, 60, 60]}]
    assert decode.quantized_speed_ratios(rows, ["int8"], {"f32": "", "bf16": ", bf16"}) == {
        "int8": {"f32": 3.0, "bf16": 1.5}}


def test_tokens_after_the_first_by_hand():
    # 2 rows, 5 new tokens: 8 tokens after the first of each row, in the time a whole run
    # takes beyond its turn's prompt and first token; a turn with no such time has no rate.
    assert decode.after_first_rates(2, 5, [500.0, 300.0, 100.0], [100.0, 140.0, 120.0]) == [
        pytest.approx(8 / 0.4), pytest.approx(8 / 0.16), None]
    assert decode.after_first_rates(1, 1, [50.0], [40.0]) == [None]


def test_batch_speed_ratios_by_hand():
    rows = [{"name": "compiled, cache", "rows": 1, "run_tokens_per_s": [10, 20, 30],
             "run_after_first_tokens_per_s": [12, None, 30]},
            {"name": "compiled, cache, batch 4", "rows": 4, "run_tokens_per_s": [30, 70, 60],
             "run_after_first_tokens_per_s": [48, 100, 150]},
            {"name": "eager, cache", "rows": 1, "run_tokens_per_s": [1, 1, 1],
             "run_after_first_tokens_per_s": [1, 1, 1]}]
    # whole: median of 3, 3.5, 2; after the first: of 4 and 5 (the second turn has none).
    assert decode.batch_speed_ratios(rows) == {4: {"whole": 3.0, "after_first": 4.5}}


def test_decode_bench_refuses_to_compare_a_dtype_with_itself():
    with pytest.raises(SystemExit, match="--compare-dtype float32 is already --dtype"):
        main([*TINY_DECODE, "--compare-dtype", "float32"])


def test_decode_bench_times_batches_against_their_bound(tmp_path):
    report_path = tmp_path / "decode.json"
    main([*TINY_DECODE, "--runs", "1", "--warmup", "0", "--batch", "1,3", "--json",
          str(report_path)])
    report = json.loads(report_path.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    single, batched = rows["compiled, cache"], rows["compiled, cache, batch 3"]
    assert batched["rows"] == 3 and batched["same_tokens"]
    # Three rows per step: three times the tokens per run, and three times the bound.
    assert batched["tokens_per_s"] == pytest.approx(3 * 3 / (batched["median_ms"] / 1e3))
    assert batched["run_bound_tokens_per_s"][0] == pytest.approx(
        3 * single["run_bound_tokens_per_s"][0], rel=0.5)
    # The prompt and first token timed alone, in each turn: the rest of a run is the other two
    # tokens of each of the three rows.
    assert 0 < batched["first_token_ms"] < batched["median_ms"] or \
        batched["after_first_tokens_per_s"] is None
    if batched["after_first_tokens_per_s"] is not None:
        assert batched["after_first_tokens_per_s"] == pytest.approx(
            3 * 2 / ((batched["median_ms"] - batched["first_token_ms"]) / 1e3))
    ratios = report["batch_speed_ratios"]["3"]
    assert ratios["whole"] == pytest.approx(batched["tokens_per_s"] / single["tokens_per_s"])


def test_decode_bench_compares_llama_cpp_on_the_same_weights(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    report_path = tmp_path / "decode.json"
    main([*TINY_DECODE, "--runs", "1", "--warmup", "0", "--compare", "llama.cpp",
          "--compare-dtype", "bfloat16", "--json", str(report_path)])
    rows = {row["name"]: row for row in json.loads(report_path.read_text())["rows"]}
    assert rows["llama.cpp F32"]["same_tokens"]  # the same greedy tokens as ours in float32
    assert rows["llama.cpp F32"]["weight_bytes_per_token"] == rows["eager, cache"][
        "weight_bytes_per_token"]
    assert rows["llama.cpp BF16"]["tokens_per_s"] > 0


def test_decode_bench_compares_int8_with_llama_cpp_q8_0(tmp_path):
    for module in ("gguf", "llama_cpp", "torchao"):
        pytest.importorskip(module)
    report_path = tmp_path / "decode.json"
    text = tmp_path / "text.txt"
    text.write_text("x = 1\n" * 2000)
    main([*TINY_DECODE, "--runs", "1", "--warmup", "0", "--compare", "llama.cpp", "--quantize",
          "int8", "--quality-data", str(text), "--json", str(report_path)])
    rows = {row["name"]: row for row in json.loads(report_path.read_text())["rows"]}
    assert rows["llama.cpp Q8_0"]["tokens_per_s"] > 0
    assert rows["llama.cpp Q8_0"]["weight_bytes_per_token"] == pytest.approx(
        rows["llama.cpp F32"]["weight_bytes_per_token"] * 34 / 32 / 4, rel=1e-6)


def test_a_trial_decode_by_llama_cpp_says_how_its_own_process_ended(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from gpt2_decl.core.config import GPT2Config
    from gpt2_decl.core.model import GPT2
    from gpt2_decl.storage.gguf import save_gguf

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, d_model=32, n_ctx=64)).eval()
    path = save_gguf(model, tmp_path / "model.gguf")
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"not a GGUF file")
    for extra_buffers in (True, False):
        assert decode.llama_trial_ends(path, 64, 8, extra_buffers) == ""
        assert decode.llama_trial_ends(not_gguf, 64, 8, extra_buffers).startswith("exit status")
    # Without extra buffer types, the float32 file still decodes to our greedy tokens.
    prompt = torch.arange(8)[None]
    ours = model.generate(prompt, 12, greedy=True)[0, 8:].tolist()
    llm = decode.load_llama(str(path), 64, 2, extra_buffers=False)
    theirs = itertools.islice(llm.generate(prompt[0].tolist(), top_k=1, temp=0.0), 12)
    assert list(theirs) == ours


def test_decode_bench_says_what_comparing_with_llama_cpp_needs(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if it were not installed
    with pytest.raises(SystemExit, match="needs llama-cpp-python"):
        main([*TINY_DECODE, "--compare", "llama.cpp"])


def test_decode_bench_times_an_int8_copy_and_measures_its_agreement(tmp_path, capsys):
    pytest.importorskip("torchao")
    text = tmp_path / "text.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(800)))
    report_path = tmp_path / "decode.json"
    main([*TINY_DECODE, "--runs", "1", "--warmup", "0", "--quantize", "int8,int8-dynamic",
          "--quality-data", str(text), "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert "eager, cache, int8" not in rows
    assert "freeze_weights" in report["cpu_decoding"]["int8-dynamic"]["used"]
    # By hand: int8 matrices with a float32 scale and an int8 zero point per output row, float
    # LayerNorms and biases; the head an int8 copy of the embedding, whose rows are looked up.
    def int8(rows_, columns):
        return rows_ * columns + rows_ * (4 + 1)

    block = (int8(96, 32) + int8(32, 32) + int8(128, 32) + int8(32, 128)
             + 4 * (2 * 32 + 96 + 32 + 2 * 32 + 128 + 32))
    assert rows["compiled, cache, int8"]["weight_bytes_per_token"] == \
        int8(50257, 32) + block + 4 * 2 * 32
    # int8 activations add nothing to what is read
    assert rows["compiled, cache, int8-dynamic"]["weight_bytes_per_token"] == \
        rows["compiled, cache, int8"]["weight_bytes_per_token"]
    out = capsys.readouterr().out
    # how the kernel does int8 products here: as digits just where the CPU has VNNI
    way = report["cpu_decoding"]["int8"]["int8_products"]
    if row_kernels.load() is None:
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            assert way == ("digits" if "avx512_vnni" in cpuinfo.read_text() else "widened")
        assert f"int8 products in the kernel: {way}" in out
    for scheme in ("int8", "int8-dynamic"):
        quality = report["quality"][scheme]
        assert quality["tokens"] == 8 * 1024 and 0.9 <= quality["top1"] <= 1.0
        assert abs(quality["loss"] - quality["reference_loss"]) < 0.05
        assert f"{scheme} against float32 on 8,192 tokens of {text}" in out
        # its speed over the float model's, turn by turn (one turn here)
        ratio = report["quantized_speed_ratios"][scheme]["float32"]
        assert ratio == pytest.approx(rows[f"compiled, cache, {scheme}"]["tokens_per_s"]
                                      / rows["compiled, cache"]["tokens_per_s"])
        assert f"{scheme} / float32, compiled, cache: {ratio:.2f}x" in out


def test_decode_bench_names_the_schemes_it_knows(capsys):
    with pytest.raises(SystemExit):
        main([*TINY_DECODE, "--quantize", "int8,int3"])
    assert "expected schemes among int8, int8-dynamic, got 'int8,int3'" in \
        capsys.readouterr().err


@pytest.mark.parametrize(("arguments", "message"), [
    (["--quality-data", "/no/such/text"], "--quality-data '/no/such/text': no such file"),
    # "x", " =", " 1", "\n" and the end-of-text token that follows each file.
    (["--quality-data", "SHORT"], "short.txt': the data has 5 tokens, fewer than one window"),
])
def test_decode_bench_checks_the_quality_text_before_timing(tmp_path, arguments, message, capsys):
    pytest.importorskip("torchao")
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    arguments = [str(short) if argument == "SHORT" else argument for argument in arguments]
    with pytest.raises(SystemExit) as exited:
        main([*TINY_DECODE, "--quantize", "int8", *arguments])
    assert message in str(exited.value.code) and "\n" not in str(exited.value.code)
    assert "timing turn" not in capsys.readouterr().out


def test_quantize_is_for_decoding():
    with pytest.raises(SystemExit, match="--quantize is for --generate"):
        main([*TINY_CLI, "--quantize", "int8"])
