"""On a CUDA GPU: parity, generation, training, no host synchronisation in the hot loops, and
flat memory. Skipped, saying why, where there is no GPU (scripts/device_check.sh runs them)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import ByteTokenizer, reference_logits

import gpt2_decl
from gpt2_decl import GPT2, GPT2Config
from gpt2_decl.text.generation import stream

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: torch.cuda.is_available() is False here"),
]

# Logits spread wide enough that greedy choices are never near-ties between devices.
DECISIVE = GPT2Config(vocab_size=211, n_ctx=64, d_model=64, n_layer=2, n_head=4, init_std=0.2,
                      seed=3)


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 off, so float32 on the GPU is compared with float32 elsewhere."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def tokens(config: GPT2Config, batch: int = 2, seq: int = 16, device: str = "cuda"):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(config.vocab_size, (batch, seq), generator=generator).to(device)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_compiled_equals_eager_on_cuda(dtype, tolerance):
    model = GPT2(DECISIVE).to("cuda", dtype).eval()
    inputs = tokens(DECISIVE)
    with torch.no_grad():
        eager = model(inputs).float()
        compiled = gpt2_decl.compile(model)(inputs).float()
    assert (compiled - eager).abs().max() <= tolerance * eager.abs().max().clamp(min=1)


def test_matches_the_longhand_reference_on_cuda():
    model = GPT2(DECISIVE).cuda().eval()
    inputs = tokens(DECISIVE)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), reference_logits(model, inputs), atol=1e-4,
                                   rtol=1e-4)


def test_parity_with_transformers_on_cuda(tmp_path):
    transformers = pytest.importorskip("transformers")
    GPT2(DECISIVE).save_pretrained(tmp_path)
    ours = GPT2.from_pretrained(tmp_path, device="cuda")
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).cuda().eval()
    inputs = tokens(DECISIVE)
    with torch.no_grad():
        assert (ours(inputs) - reference(inputs).logits).abs().max() < 1e-4


@pytest.mark.parametrize("compile", [False, True])
def test_greedy_generation_on_cuda_equals_the_cpus(compile):
    cpu = GPT2(DECISIVE).eval()
    gpu = GPT2(DECISIVE).cuda().eval()
    prompt = tokens(DECISIVE, batch=2, seq=5, device="cpu")
    expected = cpu.generate(prompt, 30, greedy=True)
    produced = gpu.generate(prompt.cuda(), 30, greedy=True, compile=compile)
    assert torch.equal(produced.cpu(), expected)


def test_training_on_cuda_learns(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    result = gpt2_decl.train(
        text, tmp_path / "out", tokenizer=ByteTokenizer(), vocab_size=ByteTokenizer.vocab_size,
        n_layer=2, n_head=4, d_model=64, n_ctx=32, batch_size=8, steps=60, lr=3e-3,
        warmup_steps=5, eval_every=60, eval_batches=2, dtype="bfloat16", compile=True,
        device="cuda", progress=False, measure_mfu=False, cache_dir=tmp_path / "cache")
    assert result.history["train"][-1][1] < result.history["train"][0][1] / 2


def test_decoding_steps_never_wait_for_the_gpu():
    model = GPT2(DECISIVE).cuda().eval()
    prompt = tokens(DECISIVE, batch=2, seq=5)
    model.generate(prompt, 8, greedy=True, compile=True)  # compile and capture first
    steps = stream(model, prompt, 40, greedy=True, compile=True)
    next(steps), next(steps)
    torch.cuda.set_sync_debug_mode("error")
    try:
        produced = [next(steps) for _ in range(30)]  # raises if a step reads the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(produced) == 30


def test_a_training_step_never_waits_for_the_gpu():
    model = GPT2(DECISIVE).cuda().train()
    compiled = gpt2_decl.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    data = tokens(DECISIVE, batch=4, seq=33)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = compiled(data[:, :-1], check_values=False)
        F.cross_entropy(logits.flatten(0, 1).float(), data[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(), step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_memory_stays_flat_over_200_decoding_steps():
    model = GPT2(DECISIVE.replace(n_ctx=256)).cuda().eval()
    prompt = tokens(DECISIVE, batch=1, seq=8)
    model.generate(prompt, 10, greedy=True, compile=True)
    torch.cuda.synchronize()
    steps = stream(model, prompt, 210, greedy=True, compile=True)
    for _ in range(10):
        next(steps)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(200):
        next(steps)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before <= 1024 * 1024  # the 200 yielded tokens aside


def test_out_of_memory_is_a_one_line_error_with_the_size_and_the_memory():
    from gpt2_decl.cli import main

    # 200,000 sequences of 1024 tokens: about 300 GiB of activations in the first layer alone.
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--device", "cuda", "--n-layer", "1", "--batch", "200000", "--seq", "1024",
              "--runs", "1", "--warmup", "0", "--no-typecheck-overhead"])
    message = str(exited.value.code)
    assert message.startswith("error: out of memory on cuda") and "\n" not in message
    assert "batch 200000" in message and "GiB free" in message


def test_a_gpu_that_is_not_there_is_refused_in_one_line():
    from gpt2_decl.core.devices import resolve_device

    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"^device 'cuda:{count}' does not exist: this machine "
                       f"has {count} CUDA GPU"):
        resolve_device(f"cuda:{count}")
