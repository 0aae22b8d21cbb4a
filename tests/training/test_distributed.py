"""torchrun + DistributedDataParallel on CPU (gloo): two processes train as one with their batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from gpt2_decl import GPT2
from gpt2_decl.training.loop import train

TEXT = "".join(f"Line {i}: the value of {i} squared is {i * i}.\n" for i in range(300))
TINY = dict(n_layer=1, n_head=2, d_model=16, n_ctx=16, steps=4, grad_accum=2, lr=1e-2,
            warmup_steps=1, eval_every=2, eval_batches=2, seed=5)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    data, cache = tmp_path / "text.txt", tmp_path / "cache"
    data.write_text(TEXT)
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in TINY.items()]
    # `python -m torch.distributed.run` is the `torchrun` command, for this very interpreter.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "-m", "gpt2_decl", "train", f"--data={data}", f"--out={tmp_path / 'ddp'}",
        f"--cache-dir={cache}", "--batch-size=2", "--device=cpu", "--no-progress", *flags,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("trained 4 steps") == 1  # rank 0 alone reports

    single = train(
        data, tmp_path / "single", batch_size=4, cache_dir=cache, device="cpu", progress=False,
        measure_mfu=False, **TINY,
    )
    distributed = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    ddp_losses = [loss for _, loss, _ in distributed["train"]]
    single_losses = [loss for _, loss, _ in single.history["train"]]
    print("two processes:", ddp_losses, "one process:", single_losses)
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)
    assert [loss for _, loss in distributed["eval"]] == pytest.approx(
        [loss for _, loss in single.history["eval"]], rel=1e-4
    )
    assert single_losses[-1] < single_losses[0]  # it trained at all
    ddp_weights = GPT2.from_pretrained(tmp_path / "ddp" / "latest").state_dict()
    single_weights = GPT2.from_pretrained(tmp_path / "single" / "latest").state_dict()
    torch.testing.assert_close(ddp_weights, single_weights, rtol=1e-4, atol=1e-5)


def test_more_processes_than_gpus_is_refused_in_one_line(monkeypatch):
    from gpt2_decl.training.distributed import gpu_of_local_rank

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert gpu_of_local_rank() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"^2 processes per node, but this machine has 1 CUDA "
                       r"GPU: NCCL needs one GPU per process \(--nproc_per_node=1\)$"):
        gpu_of_local_rank()
