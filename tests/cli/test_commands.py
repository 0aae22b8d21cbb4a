"""The `gpt2-decl` command's own behaviour: version, prompts from files, warnings, int8 and
speed-up plans from `tune` to `generate --plan`."""

import io

import pytest
import torch

from gpt2_decl import GPT2, GPT2Config, GPT2Tokenizer
from gpt2_decl.cli import main
from gpt2_decl.speedups.machine import this_machine
from gpt2_decl.speedups.plan import DECODING_CHOICES, Choice, Plan, describe_model

TINY = GPT2Config(n_ctx=64, d_model=32, n_layer=1, n_head=2, init_std=0.2)


@pytest.fixture(autouse=True)
def keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint")
    GPT2(TINY).eval().save_pretrained(directory)
    return directory


def expected_text(prompt: str, checkpoint) -> str:
    tokenizer = GPT2Tokenizer()
    model = GPT2.from_pretrained(checkpoint)
    tokens = model.generate(torch.tensor([tokenizer.encode(prompt)]), 4, greedy=True)
    return tokenizer.decode(tokens[0].tolist()) + "\n"


def test_version_names_the_package_and_torch(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("gpt2-decl 0.") and f"torch {torch.__version__}" in out


def test_generate_reads_a_long_prompt_from_a_file(tmp_path, checkpoint, capsys):
    prompt = "A prompt that a shell would find long. " * 3
    (tmp_path / "prompt.txt").write_text(prompt)
    main(["generate", "--prompt-file", str(tmp_path / "prompt.txt"), "--checkpoint",
          str(checkpoint), "--max-new-tokens", "4", "--greedy", "--device", "cpu"])
    assert capsys.readouterr().out == expected_text(prompt, checkpoint)


def test_generate_reads_the_prompt_from_standard_input(monkeypatch, checkpoint, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("From a pipe"))
    main(["generate", "--prompt-file", "-", "--checkpoint", str(checkpoint),
          "--max-new-tokens", "4", "--greedy", "--device", "cpu"])
    assert capsys.readouterr().out == expected_text("From a pipe", checkpoint)


@pytest.mark.parametrize(("arguments", "message"), [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "a", "--prompt", ""], "prompt 2 is empty"),
    (["--prompt-file", "/no/such/file"], "--prompt-file /no/such/file"),
    (["--prompt", "a", "--device", "cuda:7"], "--device"),
])
def test_generate_refuses_bad_prompts_in_one_line(arguments, message, checkpoint):
    device = [] if "--device" in arguments else ["--device", "cpu"]
    with pytest.raises(SystemExit) as exited:
        main(["generate", *arguments, "--checkpoint", str(checkpoint), *device])
    assert message in str(exited.value.code) and "\n" not in str(exited.value.code)


def test_generate_accepts_a_training_run_directory(tmp_path, checkpoint, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-0000001").symlink_to(checkpoint)
    (run / "latest").symlink_to("checkpoints/step-0000001")
    main(["generate", "--prompt", "Hi", "--checkpoint", str(run), "--max-new-tokens", "4",
          "--greedy", "--device", "cpu"])
    assert capsys.readouterr().out == expected_text("Hi", checkpoint)


def test_bench_warns_when_threads_outnumber_the_cpus(capsys, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    threads = torch.get_num_threads()
    try:  # a sequence longer than the context stops the bench after the warning
        with pytest.raises(SystemExit, match="longer than the context of 1024"):
            main(["bench", "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--seq", "2000",
                  "--threads", "3", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)  # the rest of this process keeps its threads
    assert "--threads 3 is more than this machine's 2 CPUs" in capsys.readouterr().err


def test_several_prompts_are_decoded_together_each_as_it_would_be_alone(tmp_path, checkpoint,
                                                                        capsys):
    texts = ["Hello world", "A much longer prompt than the first one", "Hi"]
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n\n")
    main(["generate", "--prompts-file", str(tmp_path / "prompts.txt"), "--checkpoint",
          str(checkpoint), "--max-new-tokens", "4", "--greedy", "--device", "cpu"])
    out = capsys.readouterr().out
    blocks = out.split("--- ")[1:]
    assert [block.split("\n", 1)[0] for block in blocks] == ["1", "2", "3"]
    for text, block in zip(texts, blocks, strict=True):
        assert block.split("\n", 1)[1] == expected_text(text, checkpoint)


def test_running_out_of_memory_is_one_line_naming_the_size():
    from gpt2_decl.cli.common import explained_out_of_memory

    with pytest.raises(SystemExit) as exited, explained_out_of_memory(torch.device("cpu"),
                                                                      "with batch 10**18"):
        torch.empty(10**18, dtype=torch.uint8)  # an exabyte: no machine has it
    message = str(exited.value.code)
    assert message.startswith("error: out of memory on cpu with batch 10**18: ")
    assert "\n" not in message


def test_running_out_of_memory_while_compiling_is_explained_too():
    from gpt2_decl.cli.common import explained_out_of_memory

    # torch.compile reports an out-of-memory met while trying kernels out as its own error.
    with pytest.raises(SystemExit) as exited, explained_out_of_memory(torch.device("cpu"), "x"):
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 585.94 GiB.")
        except torch.OutOfMemoryError as error:
            raise RuntimeError("backend='inductor' raised: OutOfMemoryError") from error
    assert str(exited.value.code) == "error: out of memory on cpu x; try smaller sizes"
    with pytest.raises(ValueError, match="unrelated"), explained_out_of_memory(
            torch.device("cpu"), "x"):
        raise ValueError("unrelated")


@pytest.mark.slow
def test_generate_decodes_with_int8_weights(checkpoint, capsys):
    pytest.importorskip("torchao")
    from gpt2_decl import quantize

    tokenizer = GPT2Tokenizer()
    model = quantize(GPT2.from_pretrained(checkpoint))
    tokens = model.generate(torch.tensor([tokenizer.encode("Hi")]), 4, greedy=True)
    main(["generate", "--prompt", "Hi", "--checkpoint", str(checkpoint), "--max-new-tokens", "4",
          "--greedy", "--device", "cpu", "--quantize", "int8", "--compile"])
    assert capsys.readouterr().out == tokenizer.decode(tokens[0].tolist()) + "\n"


def test_tune_writes_a_plan_that_generate_takes(checkpoint, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    main(["tune", "--checkpoint", str(checkpoint), "--seq", "8", "--no-decoding", "--out",
          str(plan)])
    out = capsys.readouterr().out
    assert "speed-up plan for GPT-2 n_layer=1" in out and f"wrote {plan}" in out
    with pytest.raises(SystemExit, match="tuned for forward passes only"):
        main(["generate", "--prompt", "Hi", "--checkpoint", str(checkpoint), "--plan", str(plan)])
    # A plan for decoding, as tune makes one: one query's attention upcast (the frozen steps'
    # choices, which compile for longer, are planned generation's tests).
    model = GPT2.from_pretrained(checkpoint)
    choices = tuple(Choice(name, name == "upcast_attention") for name in DECODING_CHOICES)
    Plan(describe_model(model), 1, 8, this_machine(), choices).save(plan)
    main(["generate", "--prompt", "Hi", "--checkpoint", str(checkpoint), "--max-new-tokens", "4",
          "--greedy", "--device", "cpu", "--plan", str(plan)])
    assert capsys.readouterr().out == expected_text("Hi", checkpoint)


@pytest.mark.parametrize("content, message", [
    ("{}", "is not a speed-up plan"),
    (None, "cannot read the plan"),
])
def test_generate_refuses_a_bad_plan_in_one_line(checkpoint, tmp_path, content, message):
    plan = tmp_path / "plan.json"
    if content is not None:
        plan.write_text(content)
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "Hi", "--checkpoint", str(checkpoint), "--plan", str(plan)])
    assert message in str(exited.value.code) and "\n" not in str(exited.value.code)
