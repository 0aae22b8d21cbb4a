"""The training loop: it learns, it resumes exactly, it stops safely, and eval measures it."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import ByteTokenizer, HostReads

from gpt2_decl import GPT2, GPT2Config
from gpt2_decl.cli import main
from gpt2_decl.training.loop import (
    NonFiniteLossError,
    Trainer,
    TrainingInterrupted,
    learning_rate,
    parameter_groups,
    train,
)
from gpt2_decl.training.options import TrainConfig

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
TINY = dict(
    vocab_size=ByteTokenizer.vocab_size, n_layer=2, n_head=4, d_model=64, n_ctx=32, batch_size=8,
    warmup_steps=10, eval_batches=2, measure_mfu=False, progress=False, device="cpu",
)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models run several times faster on one thread than on a busy shared CPU's two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def run(text_file, out, **options):
    settings = {**TINY, "cache_dir": text_file.parent / "cache", **options}
    return train(text_file, out, tokenizer=ByteTokenizer(), **settings)


def weights(directory) -> dict[str, torch.Tensor]:
    return GPT2.from_pretrained(directory).state_dict()


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    config = TrainConfig(data="", out="", lr=1e-3, min_lr=1e-4, warmup_steps=10, steps=110)
    assert learning_rate(0, config) == pytest.approx(1e-4)
    assert learning_rate(4, config) == pytest.approx(5e-4)
    assert learning_rate(9, config) == pytest.approx(1e-3)
    assert learning_rate(10, config) == pytest.approx(1e-3)
    # Halfway through the decay cos(pi/2) = 0: midway between lr and min_lr.
    assert learning_rate(60, config) == pytest.approx(5.5e-4)
    # A quarter of the way: min + (lr - min) (1 + cos(pi/4)) / 2.
    assert learning_rate(35, config) == pytest.approx(1e-4 + 9e-4 * (1 + math.sqrt(0.5)) / 2)
    assert learning_rate(110, config) == pytest.approx(1e-4)
    assert TrainConfig(data="", out="", lr=6e-4).final_lr == pytest.approx(6e-5)


def test_weight_decay_applies_to_matrices_only_and_the_tied_one_once():
    model = GPT2(GPT2Config(vocab_size=50, n_ctx=8, d_model=16, n_layer=2, n_head=2))
    decayed, kept = parameter_groups(model, weight_decay=0.1)
    assert (decayed["weight_decay"], kept["weight_decay"]) == (0.1, 0.0)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    matrices = {"token_embedding.weight", "position_embedding.weight"} | {
        f"blocks.{block}.{part}.weight"
        for block in range(2) for part in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")
    }
    vectors = {"ln_f.weight", "ln_f.bias"} | {
        f"blocks.{block}.{part}"
        for block in range(2)
        for part in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.qkv.bias",
                     "attn.proj.bias", "mlp.up.bias", "mlp.down.bias")
    }
    assert sorted(names[id(p)] for p in decayed["params"]) == sorted(matrices)
    assert sorted(names[id(p)] for p in kept["params"]) == sorted(vectors)
    assert model.lm_head.weight is model.token_embedding.weight
    tied = sum(p is model.lm_head.weight for p in decayed["params"] + kept["params"])
    assert tied == 1


def test_a_tiny_model_memorises_a_repeated_sentence(text_file, tmp_path):
    out = tmp_path / "out"
    result = run(text_file, out, steps=150, lr=3e-3, eval_every=50, checkpoint_every=1000)

    first_loss = result.history["train"][0][1]
    assert first_loss == pytest.approx(math.log(ByteTokenizer.vocab_size), abs=0.3)  # ~uniform
    last_losses = [loss for _, loss, _ in result.history["train"][-10:]]
    assert sum(last_losses) / len(last_losses) < 0.1
    assert result.eval_loss < 0.1
    assert [step for step, _ in result.history["eval"]] == [50, 100, 150]

    # Given 16 characters of context, it predicts every following character of the sentence.
    model = GPT2.from_pretrained(out / "latest")
    window = torch.tensor([list(TEXT[7:39].encode())])
    predicted = model(window).argmax(-1)[0, 15:-1]
    assert bytes(predicted.tolist()) == TEXT[7 + 16 : 39].encode()

    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["train"]) == 150 and len(metrics["eval"]) == 3


def test_a_stopped_and_resumed_run_reaches_the_uninterrupted_weights(text_file, tmp_path):
    options = dict(steps=6, lr=3e-3, grad_accum=2, eval_every=2, checkpoint_every=4, warmup_steps=2)
    whole = run(text_file, tmp_path / "whole", **options)

    def stop_at_3(report):
        if report.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as stopped:
        run(text_file, tmp_path / "parts", on_step=stop_at_3, **options)
    assert stopped.value.step == 3
    assert os.readlink(tmp_path / "parts" / "latest") == os.path.join("checkpoints", "step-0000003")
    state = torch.load(stopped.value.checkpoint / "training_state.pt", weights_only=True)
    assert state["step"] == 3

    resumed = run(text_file, tmp_path / "parts", resume=True, **options)
    assert resumed.step == whole.step == 6
    final = weights(tmp_path / "parts" / "latest")
    torch.testing.assert_close(final, weights(tmp_path / "whole" / "latest"), rtol=0, atol=0)
    assert resumed.history == whole.history
    kept = sorted(path.name for path in (tmp_path / "parts" / "checkpoints").iterdir())
    assert kept == ["step-0000003", "step-0000004", "step-0000006"]


def test_resume_refuses_what_it_cannot_continue(text_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        run(text_file, tmp_path / "empty", steps=1, resume=True)
    run(text_file, tmp_path / "done", steps=1, eval_every=1)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        run(text_file, tmp_path / "done", steps=2)
    with pytest.raises(ValueError, match="d_model 64 -> 32"):
        run(text_file, tmp_path / "done", steps=2, resume=True, d_model=32)


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(text_file, tmp_path):
    out = tmp_path / "out"
    # Every AdamW update moves each weight by about lr, so the first step makes them ~1e30 and
    # the next forward pass overflows float32.
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step 2") as error:
        run(text_file, out, steps=10, lr=1e30, warmup_steps=0, checkpoint_every=1, eval_every=10)
    assert error.value.step == 2
    assert os.readlink(out / "latest") == os.path.join("checkpoints", "step-0000001")
    assert [path.name for path in (out / "checkpoints").iterdir()] == ["step-0000001"]
    assert "the last good checkpoint is" in str(error.value)


def test_data_outside_the_vocabulary_is_refused(text_file, tmp_path):
    with pytest.raises(ValueError, match="token id 256, but the model's vocabulary has 100 ids"):
        run(text_file, tmp_path / "out", steps=1, vocab_size=100)


def test_eval_prints_the_checkpoints_loss_and_perplexity(tmp_path, capsys):
    """Against an independent computation: the held-out tail, cut into n_ctx windows by hand."""
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out, cache = tmp_path / "out", tmp_path / "cache"
    train(
        data, out, n_layer=1, n_head=2, d_model=16, n_ctx=16, batch_size=2, steps=2, eval_every=2,
        val_fraction=0.25, cache_dir=cache, progress=False, measure_mfu=False, device="cpu",
    )
    assert main(["eval", "--checkpoint", str(out), "--data", str(data), "--cache-dir", str(cache),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    loss = float(printed.split("loss ")[1].split()[0])
    perplexity = float(printed.split("perplexity ")[1].split()[0])

    from gpt2_decl.text.tokenizer import GPT2Tokenizer

    tokens = GPT2Tokenizer().encode(TEXT) + [GPT2Tokenizer.eot_id]
    held_out = torch.tensor(tokens[len(tokens) - round(len(tokens) * 0.25) :])
    windows = (len(held_out) - 1) // 16
    inputs = held_out[: windows * 16].view(windows, 16)
    targets = held_out[1 : windows * 16 + 1].view(windows, 16)
    model = GPT2.from_pretrained(out / "latest")
    with torch.no_grad():
        expected = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).item()
    assert loss == pytest.approx(expected, abs=1e-4)
    assert perplexity == pytest.approx(math.exp(expected), rel=1e-3)


def test_ctrl_c_saves_a_checkpoint_before_exiting(text_file, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "gpt2_decl", "train", "--data", str(text_file), "--out", str(out),
        "--cache-dir", str(tmp_path / "cache"), "--n-layer", "1", "--n-head", "2", "--d-model",
        "16", "--n-ctx", "16", "--batch-size", "2", "--steps", "100000", "--checkpoint-every",
        "5", "--eval-every", "100000", "--device", "cpu", "--no-progress",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "latest").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted after step" in stderr and "--resume" in stderr
    step = int(stderr.split("interrupted after step ")[1].split(";")[0])
    assert step >= 5
    assert os.readlink(out / "latest") == os.path.join("checkpoints", f"step-{step:07d}")
    state = torch.load(out / "latest" / "training_state.pt", weights_only=True)
    assert state["step"] == step


def test_init_from_starts_from_the_checkpoint_weights(text_file, tmp_path):
    architecture = ("vocab_size", "n_layer", "n_head", "d_model", "n_ctx")
    start = GPT2(GPT2Config(seed=123, **{key: TINY[key] for key in architecture}))
    start.save_pretrained(tmp_path / "start")
    options = {key: value for key, value in TINY.items() if key not in architecture}
    # Adam moves each weight by about lr per step: with lr 1e-12 the result is the checkpoint's.
    train(
        text_file, tmp_path / "out", tokenizer=ByteTokenizer(), cache_dir=tmp_path / "cache",
        init_from=str(tmp_path / "start"), steps=1, lr=1e-12, weight_decay=0.0, **options,
    )
    finished = weights(tmp_path / "out" / "latest")
    for name, tensor in start.state_dict().items():
        torch.testing.assert_close(finished[name], tensor, rtol=0, atol=1e-9, msg=name)


# --- faults ----------------------------------------------------------------------------------

HOLD = """
import sys, time
from gpt2_decl.storage.lock import DirectoryLock
DirectoryLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_run_into_a_held_directory_fails_at_once_naming_the_holder(text_file, tmp_path):
    from gpt2_decl.storage.lock import DirectoryInUseError

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryInUseError, match=f"in use by a training run .PID "
                                                      f"{holder.pid}."):
            run(text_file, tmp_path / "out", steps=1)
    finally:
        holder.kill()
        holder.wait()
    run(text_file, tmp_path / "out", steps=1)  # the dead holder's claim is taken over
    assert not (tmp_path / "out" / ".gpt2_decl.lock").exists()


def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(text_file, tmp_path, capsys):
    options = dict(steps=4, lr=3e-3, eval_every=2, checkpoint_every=2, warmup_steps=1)
    out = tmp_path / "out"
    run(text_file, out, **options)
    state = out / "checkpoints" / "step-0000004" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    resumed = run(text_file, out, resume=True, **{**options, "steps": 5})
    assert resumed.step == 5
    err = capsys.readouterr().err
    assert "skipped damaged checkpoints (step-0000004:" in err and "step-0000002" in err
    # Set aside under another name: neither resumed from again nor counted among those kept.
    assert (out / "checkpoints" / "damaged-step-0000004" / "training_state.pt").exists()


def test_resume_after_the_latest_checkpoint_was_deleted_takes_the_one_before(text_file, tmp_path):
    options = dict(steps=4, lr=3e-3, eval_every=2, checkpoint_every=2, warmup_steps=1)
    out = tmp_path / "out"
    run(text_file, out, **options)
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    assert run(text_file, out, resume=True, **{**options, "steps": 3}).step == 3


def test_resume_with_nothing_intact_lists_what_it_found(text_file, tmp_path):
    out = tmp_path / "out"
    run(text_file, out, steps=2, checkpoint_every=1, eval_every=2)
    for step in (1, 2):
        (out / "checkpoints" / f"step-000000{step}" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(FileNotFoundError, match="no checkpoint in .* loads whole: step-0000002: "
                                                ".*; step-0000001: "):
        run(text_file, out, steps=3, resume=True)


@pytest.mark.parametrize("options", [
    dict(init_from="no/such/checkpoint"), dict(d_model=30), dict(resume=True),
    dict(vocab_size=100), dict(val_fraction=0.99),
])
def test_a_run_that_cannot_start_leaves_no_output_directory(text_file, tmp_path, options):
    with pytest.raises((ValueError, FileNotFoundError)):
        run(text_file, tmp_path / "out", steps=1, **options)
    assert not (tmp_path / "out").exists()


def test_binary_files_are_skipped_and_counted(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text(TEXT)
    (tmp_path / "data" / "logo.png.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" * 100)
    result = train(tmp_path / "data", tmp_path / "out", tokenizer=ByteTokenizer(), steps=1,
                   cache_dir=tmp_path / "cache", **{k: v for k, v in TINY.items()})
    assert result.step == 1
    assert "skipped 1 files that are not text" in capsys.readouterr().err


@pytest.mark.parametrize(("arguments", "message"), [
    (["train", "--device", "tpu"], "unknown device 'tpu'"),
    (["eval", "--batch-size", "0"], "batch size must be a positive integer, got 0"),
    (["eval", "--max-batches", "0"], "max batches must be a positive integer or None, got 0"),
])
def test_cli_refuses_bad_options_in_one_line(text_file, tmp_path, arguments, message):
    command, *rest = arguments
    paths = (["--out", str(tmp_path / "out")] if command == "train"
             else ["--checkpoint", str(tmp_path / "checkpoint")])
    if command == "eval":
        GPT2(GPT2Config(n_layer=1, n_head=2, d_model=16, n_ctx=16)).save_pretrained(
            tmp_path / "checkpoint")
    with pytest.raises(SystemExit) as exited:
        main([command, "--data", str(text_file), *paths, "--cache-dir", str(tmp_path / "c"),
              *rest])
    assert message in str(exited.value.code) and "\n" not in str(exited.value.code)


def test_cli_says_when_the_output_directory_cannot_be_written(text_file, tmp_path):
    # A file where a directory should be: unwritable even for root, unlike a read-only folder.
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match="cannot write to"):
        main(["train", "--data", str(text_file), "--out", str(tmp_path / "a-file" / "out"),
              "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--n-ctx", "16",
              "--steps", "1", "--device", "cpu", "--no-progress"])


def test_a_training_step_reads_nothing_back_from_the_device(text_file, tmp_path, monkeypatch):
    reads = []
    original = Trainer.train_step

    def counted(self, batches, lr, stop_requested):
        if self.step < 2:  # the first steps compile and warm up
            return original(self, batches, lr, stop_requested)
        with HostReads() as mode:
            totals = original(self, batches, lr, stop_requested)
        reads.extend(mode.calls)
        return totals

    monkeypatch.setattr(Trainer, "train_step", counted)
    run(text_file, tmp_path / "out", steps=4, grad_accum=2, eval_every=4)
    assert reads == []


def test_a_save_interrupted_inside_a_checkpoint_leaves_nothing_after_the_next(text_file, tmp_path):
    out = tmp_path / "out"
    run(text_file, out, steps=1, eval_every=1)
    root = out / "checkpoints"
    # What a kill during a checkpoint's weights leaves: its partial directory, and the staging
    # directory of the weights' own atomic save beside it.
    (root / ".step-0000002.0123.partial").mkdir()
    (root / "..step-0000002.0123.partial.4567.staging").mkdir()
    run(text_file, out, steps=2, eval_every=1, resume=True)
    assert sorted(path.name for path in root.iterdir()) == ["step-0000001", "step-0000002"]
