"""The benchmarks: `gpt2-decl bench` (forward passes and decoding) end to end on tiny models,
its figures checked by hand and against other engines' results on the same weights."""

import itertools
import json
import sys

import pytest
import torch

from gpt2_decl.bench import capture, decode, engines
from gpt2_decl.bench.measure import ReadBandwidth
from gpt2_decl.cli import main
from gpt2_decl.core.config import GPT2Config
from gpt2_decl.core.timing import Timing

TINY_CLI = ["bench", "--n-layer", "2", "--d-model", "64", "--n-head", "4", "--threads", "1"]
# Smokes of whole commands compile one block: each compile costs half what two blocks' would.
ONE_BLOCK_CLI = ["bench", "--n-layer", "1", "--d-model", "64", "--n-head", "4", "--threads", "1"]
TINY_DECODE = ["bench", "--generate", "--n-layer", "1", "--n-head", "2", "--d-model", "32",
               "--prompt-len", "4", "--new-tokens", "3", "--device", "cpu", "--threads", "1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The command sets torch's thread count for the whole process; later tests get it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_read_bandwidth_is_the_bytes_read_over_the_time():
    bandwidth = ReadBandwidth(torch.device("cpu"), n_bytes=2**20)
    assert bandwidth().item() == 2**18  # a sum of ones
    assert bandwidth.bytes_per_s(Timing((2.0,))) == pytest.approx(2**20 / 2e-3)


def test_forward_bench_times_compiled_beside_eager(tmp_path):
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    main([*ONE_BLOCK_CLI, "--seq", "8", "--runs", "1", "--json", str(report_path),
          "--plot", str(plot_path)])
    report = json.loads(report_path.read_text())
    assert report["dtype"] == "float32" and report["threads"] == 1
    [row] = report["rows"]
    assert row["seq"] == 8 and row["max_abs_diff"] < 1e-4
    for key in ("eager_ms", "compiled_ms", "typechecked_eager_ms", "roofline_flops_per_s"):
        assert row[key] > 0, key
    assert "tuned_ms" not in row
    assert plot_path.read_bytes().startswith(PNG_SIGNATURE)


# A plan's frozen graph is compiled afresh in every process (inductor's FX cache passes over
# frozen graphs): seconds that the default run leaves to the planned forward's own tests.
@pytest.mark.slow
def test_forward_bench_times_plain_and_tuned_compiles_beside_eager(tmp_path, capsys):
    report_path = tmp_path / "bench.json"
    main([*TINY_CLI, "--seq", "8", "--runs", "1", "--tune", "--json", str(report_path)])
    [row] = json.loads(report_path.read_text())["rows"]
    assert row["tuned_ms"] > 0 and row["max_abs_diff"] < 1e-4
    assert [choice["name"] for choice in row["plan"]["choices"]] == ["upcast_products",
                                                                 "padded_vocab"]
    assert "speed-up plan for GPT-2 n_layer=2" in capsys.readouterr().out


@pytest.mark.slow
def test_forward_bench_compares_transformers_compiled_on_the_same_weights(tmp_path, capsys):
    pytest.importorskip("transformers")
    report_path = tmp_path / "bench.json"
    main([*TINY_CLI, "--seq", "8,16", "--runs", "2", "--tune", "--compare", "transformers",
          "--no-typecheck-overhead", "--json", str(report_path)])
    for row in json.loads(report_path.read_text())["rows"]:
        assert row["max_abs_diff_vs_transformers"] < 1e-4  # the same weights, the same logits
        assert row["transformers_compiled_ms"] > 0
    assert "over tf" in capsys.readouterr().out


@pytest.mark.parametrize("arguments, message", [
    (["--seq", "0"], "positive"),
    (["--runs", "0"], "positive integer"),
    (["--d-model", "66"], "divisible by n_head"),
    (["--seq", "2048"], "longer than the context"),
    (["--checkpoint", "x"], "--checkpoint is for --generate"),
    (["--batch", "1,4"], "forward passes take one --batch"),
    (["--quantize", "int8"], "--quantize is for --generate"),
])
def test_forward_bench_rejects_bad_options_clearly(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY_CLI, *arguments])
    assert message in str(exit_info.value.code) + capsys.readouterr().err


def test_decode_bench_reports_every_way_of_decoding_against_its_bound(tmp_path, capsys):
    report_path = tmp_path / "decode.json"
    main([*TINY_DECODE, "--runs", "2", "--warmup", "0", "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["eager, cache", "compiled, cache", "transformers generate"]
    # Weights read per token by hand: token embedding 50257 x 32, one block, ln_f; float32.
    block = 2 * 32 + 32 * 96 + 96 + 32 * 32 + 32 + 2 * 32 + 32 * 128 + 128 + 128 * 32 + 32
    weight_bytes = 4 * (50257 * 32 + block + 2 * 32)
    for row in report["rows"]:
        assert row["same_tokens"], row["name"]  # transformers' tokens too: the same weights
        assert row["weight_bytes_per_token"] == weight_bytes
        assert len(row["run_tokens_per_s"]) == len(row["run_bound_fractions"]) == 2
    assert "transformers generate" in capsys.readouterr().out


def test_tokens_after_the_first_by_hand():
    # 2 rows, 5 new tokens: 8 tokens after the first of each row, in the time a whole run
    # takes beyond its turn's prompt and first token; a turn with no such time has no rate.
    assert decode.after_first_rates(2, 5, [500.0, 300.0, 100.0], [100.0, 140.0, 120.0]) == [
        pytest.approx(8 / 0.4), pytest.approx(8 / 0.16), None]
    assert decode.after_first_rates(1, 1, [50.0], [40.0]) == [None]


def test_ratios_by_name_are_medians_over_the_turns_both_have():
    rows = [{"name": "a", "run_tokens_per_s": [10, 20, 30],
             "run_after_first_tokens_per_s": [12, None, 30]},
            {"name": "b", "run_tokens_per_s": [30, 70, 60],
             "run_after_first_tokens_per_s": [48, 100, 150]}]
    # Whole runs: the median of 3, 3.5 and 2; after the first: of 4 and 5.
    assert decode.ratio_by_name(rows, "b", "a") == 3.0
    assert decode.ratio_by_name(rows, "b", "a", "run_after_first_tokens_per_s") == 4.5
    assert decode.ratio_by_name(rows, "b", "not timed") is None


def test_decode_bench_refuses_to_compare_a_dtype_with_itself():
    with pytest.raises(SystemExit, match="--compare-dtype float32 is already --dtype"):
        main([*TINY_DECODE, "--compare-dtype", "float32"])


def test_decode_bench_names_the_schemes_it_knows(capsys):
    with pytest.raises(SystemExit):
        main([*TINY_DECODE, "--quantize", "int8,int3"])
    assert "expected schemes among int8, got 'int8,int3'" in capsys.readouterr().err


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


def test_decode_bench_says_what_comparing_with_llama_cpp_needs(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if it were not installed
    with pytest.raises(SystemExit, match="needs llama-cpp-python"):
        main([*TINY_DECODE, "--compare", "llama.cpp"])


@pytest.mark.slow
def test_decode_bench_with_every_kind_of_model_batch_and_plan(tmp_path, capsys):
    pytest.importorskip("torchao")
    text = tmp_path / "text.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(800)))
    report_path = tmp_path / "decode.json"
    main([*TINY_DECODE, "--runs", "2", "--warmup", "0", "--batch", "1,3", "--tune",
          "--compare-dtype", "bfloat16", "--quantize", "int8", "--quality-data", str(text),
          "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {
        "eager, cache", "compiled, cache", "compiled, cache, tuned", "compiled, cache, batch 3",
        "compiled, cache, tuned, batch 3", "transformers generate", "compiled, cache, bfloat16",
        "compiled, cache, tuned, bfloat16", "compiled, cache, int8",
        "compiled, cache, tuned, int8"}
    for name in ("compiled, cache", "compiled, cache, tuned", "compiled, cache, batch 3",
                 "compiled, cache, tuned, batch 3"):
        assert rows[name]["same_tokens"], name  # float32's greedy tokens, compiled any way
    assert rows["compiled, cache, bfloat16"]["weight_bytes_per_token"] * 2 == \
        rows["compiled, cache"]["weight_bytes_per_token"]

    # By hand: int8 matrices with a float32 scale and an int8 zero point per output row, float
    # LayerNorms and biases; the head an int8 copy of the embedding, whose rows are looked up.
    def int8(rows_, columns):
        return rows_ * columns + rows_ * (4 + 1)

    block = (int8(96, 32) + int8(32, 32) + int8(128, 32) + int8(32, 128)
             + 4 * (2 * 32 + 96 + 32 + 2 * 32 + 128 + 32))
    assert rows["compiled, cache, int8"]["weight_bytes_per_token"] == \
        int8(50257, 32) + block + 4 * 2 * 32
    assert set(report["plans"]) == {"float32, batch 1", "float32, batch 3", "bfloat16, batch 1",
                                    "int8, batch 1"}
    assert {"tuned / plain, float32", "compiled, cache, batch 3 / batch 1",
            "compiled, cache, tuned, int8 / float32"} <= set(report["speed_ratios"])
    quality = report["quality"]["int8"]
    assert quality["tokens"] == 8 * 1024 and 0.9 <= quality["top1"] <= 1.0
    assert abs(quality["loss"] - quality["reference_loss"]) < 0.05


@pytest.mark.slow
def test_decode_bench_compares_llama_cpp_on_the_same_weights(tmp_path):
    for module in ("gguf", "llama_cpp", "torchao"):
        pytest.importorskip(module)
    text = tmp_path / "text.txt"
    text.write_text("x = 1\n" * 2000)
    report_path = tmp_path / "decode.json"
    main([*TINY_DECODE, "--runs", "1", "--warmup", "0", "--compare", "llama.cpp",
          "--compare-dtype", "bfloat16", "--quantize", "int8", "--quality-data", str(text),
          "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["llama.cpp F32"]["same_tokens"]  # the same greedy tokens as ours in float32
    assert rows["llama.cpp F32"]["weight_bytes_per_token"] == rows["eager, cache"][
        "weight_bytes_per_token"]
    assert rows["llama.cpp Q8_0"]["weight_bytes_per_token"] == pytest.approx(
        rows["llama.cpp F32"]["weight_bytes_per_token"] * 34 / 32 / 4, rel=1e-6)
    assert "compiled, cache, int8 / llama.cpp Q8_0" in report["speed_ratios"]


def test_a_trial_decode_by_llama_cpp_says_how_its_own_process_ended(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from gpt2_decl.core.config import GPT2Config
    from gpt2_decl.core.model import GPT2
    from gpt2_decl.storage.gguf import save_gguf

    model = GPT2(GPT2Config(n_layer=1, n_head=2, d_model=32, n_ctx=64)).eval()
    path = save_gguf(model, tmp_path / "model.gguf")
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"not a GGUF file")
    assert engines.llama_trial_ends(path, 64, 8) == ""
    assert engines.llama_trial_ends(not_gguf, 64, 8).startswith("exit status")
    # The float32 file decodes to our greedy tokens.
    prompt = torch.arange(8)[None]
    ours = model.generate(prompt, 12, greedy=True)[0, 8:].tolist()
    llm = engines.load_llama(str(path), 64, 2)
    assert list(itertools.islice(llm.generate(prompt[0].tolist(), top_k=1, temp=0.0), 12)) == ours


def test_capture_bench_times_each_way_and_counts_what_it_captured(tmp_path, capsys):
    report_path = tmp_path / "capture.json"
    main([*ONE_BLOCK_CLI, "--capture", "--seq", "8", "--runs", "1", "--json", str(report_path)])
    rows = {row["name"]: row for row in json.loads(report_path.read_text())["rows"]}
    assert list(rows) == ["compiled, plain", "compiled, resid_post", "compiled, all but patterns",
                          "compiled, everything", "eager, everything"]
    # By hand: 1 block of 15 names, 5 of the model's; 2 of the block's are the patterns.
    counts = {name: row["captured"] for name, row in rows.items()}
    assert counts == {"compiled, plain": 0, "compiled, resid_post": 1,
                      "compiled, all but patterns": 18, "compiled, everything": 20,
                      "eager, everything": 20}
    assert rows["compiled, resid_post"]["captured_bytes"] == 8 * 64 * 4  # float32
    assert all(row["median_ms"] > 0 and row["fresh_bytes"] >= 0 for row in rows.values())
    assert "over plain" in capsys.readouterr().out


@pytest.mark.slow
def test_capture_bench_compiles_the_compiled_ways_with_a_tuned_plan(tmp_path):
    report_path = tmp_path / "capture.json"
    main([*ONE_BLOCK_CLI, "--capture", "--tune", "--dtype", "bfloat16", "--seq", "8",
          "--runs", "1", "--warmup", "0", "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["plan"]["format"] == "gpt2_decl speed-up plan"
    assert report["plan"]["decoding"] is False
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["compiled, everything"]["captured"] == 20
    assert rows["compiled, resid_post"]["captured_bytes"] == 8 * 64 * 2  # bfloat16


@pytest.mark.parametrize("together", [False, True])
def test_a_way_that_fails_in_its_process_is_an_error_naming_the_way(together):
    config = GPT2Config(n_layer=1, n_head=2, d_model=32, n_ctx=8)
    too_long = capture.Setup(config, torch.float32, "cpu", batch=1, seq=9)
    with pytest.raises(RuntimeError, match=r"(?s)compiled, plain: its process failed.*9 tokens"):
        capture.benchmark_capture(too_long, runs=1, warmup=0, together=together,
                                  log=lambda message: None)


def test_transformer_lens_is_for_capture():
    with pytest.raises(SystemExit, match="--compare transformer_lens is for --capture"):
        main([*TINY_CLI, "--compare", "transformer_lens"])
