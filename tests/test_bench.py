"""The benchmark: its FLOP formula against hand-computed values, its timing helper, and the
`gpt2-decl bench` command end to end on a tiny model."""

import json
import math

import pytest
import torch

from gpt2_decl import GPT2Config, bench, huge_pages
from gpt2_decl.cli import main

# GPT-2 small from the reference table: 124,439,808 parameters tied, 1024 x 768 of them the
# position embedding; 12 layers of width 768.
SMALL_TIED = 124_439_808
SMALL_POSITION_EMBEDDING = 1024 * 768

# A tiny model, with every parameter counted by hand (d_model 64, 4 heads, 2 layers, vocab 100).
TINY = dict(vocab_size=100, n_ctx=32, d_model=64, n_layer=2, n_head=4)
TINY_BLOCK = (
    2 * 64  # ln_1
    + 64 * 192
    + 192  # fused qkv
    + 64 * 64
    + 64  # attention out
    + 2 * 64  # ln_2
    + 64 * 256
    + 256  # mlp in
    + 256 * 64
    + 64  # mlp out
)
TINY_WITHOUT_POSITIONS = 100 * 64 + 2 * TINY_BLOCK + 2 * 64  # token embedding, blocks, ln_f

TINY_CLI = ["bench", "--n-layer", "2", "--d-model", "64", "--n-head", "4", "--threads", "1"]
REQUIRED_ROW_KEYS = {
    "eager_ms",
    "compiled_ms",
    "compile_s",
    "speedup",
    "max_abs_diff",
    "tokens_per_s",
    "roofline_fraction",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The command sets torch's thread count for the whole process; later tests get it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_flops_per_token_of_gpt2_small_at_full_context():
    expected = 2 * (SMALL_TIED - SMALL_POSITION_EMBEDDING) + 4 * 12 * 1024 * 768
    assert expected == 285_055_488  # "about 284.8 MFLOP per token" in the notes
    assert bench.forward_flops_per_token(GPT2Config.from_preset("small"), 1024) == expected


def test_flops_of_a_tiny_forward_pass_counted_by_hand():
    assert TINY_WITHOUT_POSITIONS == 106_496
    config = GPT2Config(**TINY)
    per_token = 2 * 106_496 + 4 * 2 * 16 * 64
    assert bench.forward_flops_per_token(config, 16) == per_token == 221_184
    assert bench.forward_flops(config, batch=3, seq=16) == 3 * 16 * 221_184


def test_flops_of_gpt2_small_batch_8_at_full_context_is_about_2_33_tflop():
    flops = bench.forward_flops(GPT2Config.from_preset("small"), batch=8, seq=1024)
    assert flops == pytest.approx(2.33e12, rel=0.005)


def test_time_call_warms_up_then_times_each_run():
    calls = []
    timing = bench.time_call(lambda: calls.append(None), torch.device("cpu"), runs=4, warmup=2)
    assert len(calls) == 6
    assert timing.runs == 4
    assert 0 <= timing.min_ms <= timing.median_ms <= timing.max_ms


@pytest.mark.parametrize("runs, warmup", [(0, 1), (3, -1)])
def test_time_call_rejects_impossible_counts(runs, warmup):
    with pytest.raises(ValueError, match="runs"):
        bench.time_call(lambda: None, torch.device("cpu"), runs=runs, warmup=warmup)


def test_rooflines_are_positive_and_finite():
    cpu = torch.device("cpu")
    flops = bench.measure_matmul_roofline(cpu, torch.float32, size=128, runs=2, warmup=1)
    bandwidth = bench.measure_copy_bandwidth(cpu, n_bytes=2**20, runs=2, warmup=1)
    assert math.isfinite(flops) and flops > 0
    assert math.isfinite(bandwidth) and bandwidth > 0


def test_copy_bandwidth_on_huge_pages_is_cpu_only():
    if huge_pages.available():
        cpu = torch.device("cpu")
        bandwidth = bench.measure_copy_bandwidth(
            cpu, n_bytes=2**21, runs=2, warmup=1, huge_pages=True
        )
        assert math.isfinite(bandwidth) and bandwidth > 0
    with pytest.raises(ValueError, match="huge pages are CPU memory"):
        bench.measure_copy_bandwidth(torch.device("meta"), huge_pages=True)


def test_cli_writes_json_with_every_figure_and_a_png(tmp_path, capsys):
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    main(
        [
            *TINY_CLI,
            "--seq",
            "8,16",
            "--runs",
            "2",
            "--json",
            str(report_path),
            "--plot",
            str(plot_path),
        ]
    )
    out = capsys.readouterr().out

    report = json.loads(report_path.read_text())
    assert report["dtype"] == "float32" and report["device"] == "cpu"
    assert report["torch"] == torch.__version__ and report["threads"] == 1
    assert report["roofline_flops_per_s"] > 0
    assert [row["seq"] for row in report["rows"]] == [8, 16]
    for row in report["rows"]:
        assert REQUIRED_ROW_KEYS <= row.keys()
        assert row["max_abs_diff"] < 1e-4
        for key in ("eager_ms", "compiled_ms", "compile_s", "tokens_per_s", "roofline_fraction"):
            assert row[key] > 0, key
        assert row["speedup"] == pytest.approx(row["eager_ms"] / row["compiled_ms"])
        assert row["tokens_per_s"] == pytest.approx(row["seq"] / (row["compiled_ms"] / 1e3))
        assert row["typechecked_eager_ms"] > 0 and row["roofline_flops_per_s"] > 0

    assert "compiling (seq=8" in out and "compiling (seq=16" in out
    table_rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["8"], ["16"])]
    assert len(table_rows) == 2
    assert plot_path.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--seq", "8,x"], "comma-separated integers"),
        (["--seq", "0"], "positive"),
        (["--runs", "0"], "positive integer"),
        (["--d-model", "66"], "divisible by n_head"),
        (["--seq", "2048"], "longer than the context"),
    ],
)
def test_cli_rejects_bad_options_clearly(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY_CLI, *arguments])
    assert message in str(exit_info.value.code) + capsys.readouterr().err
