"""Other engines on the same weights, for the benchmarks: transformers' GPT-2 (compiled forward
passes, `generate`) and llama.cpp (llama-cpp-python), each through its public API."""

import itertools
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from gpt2_decl.storage.gguf import save_gguf

# llama.cpp's file types the decode bench writes, with their bytes per weight: Q8_0 is 32 int8
# weights and a float16 scale per block.
LLAMA_FILES = {"F32": 4.0, "BF16": 2.0, "Q8_0": 34 / 32}
# A trial decode by llama.cpp in a process of its own (argv: GGUF path, n_ctx, threads, prompt
# tokens), so that a crash inside llama.cpp leaves the bench standing.
LLAMA_TRIAL = """
import sys
from gpt2_decl.bench.engines import load_llama
path, n_ctx, n_threads, prompt_tokens = sys.argv[1:]
llm = load_llama(path, int(n_ctx), int(n_threads))
for _ in zip(range(4), llm.generate(list(range(int(prompt_tokens))), top_k=1, temp=0.0)):
    pass
"""


def transformers_copy(model: nn.Module) -> nn.Module | None:
    """transformers' `GPT2LMHeadModel` (SDPA attention) with `model`'s weights, on its device,
    in its dtype, for inference; None, said, if transformers is not installed."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        print("transformers is not installed: no reference row")
        return None
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        reference = GPT2LMHeadModel.from_pretrained(directory, dtype=model.dtype,
                                                    attn_implementation="sdpa")
    return reference.to(model.device).eval()


def transformers_generate(model: nn.Module) -> Callable[[Tensor, int], Tensor] | None:
    """transformers' greedy `generate` on `model`'s weights (None if it is not installed)."""
    reference = transformers_copy(model)
    if reference is None:
        return None
    reference.generation_config.eos_token_id = None  # exactly the tokens asked for, as ours
    reference.generation_config.pad_token_id = 0

    def decode(prompt: Tensor, new: int) -> Tensor:
        with torch.no_grad():
            return reference.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      max_new_tokens=new, do_sample=False)

    return decode


def load_llama(path: str, n_ctx: int, n_threads: int):
    """llama.cpp's model of a GGUF file."""
    import llama_cpp

    return llama_cpp.Llama(path, n_ctx=n_ctx, verbose=False, n_threads=n_threads)


def llama_trial_ends(path: Path, n_ctx: int, prompt_tokens: int) -> str:
    """How a trial decode of `path` by llama.cpp ended in a process of its own: "" if it
    decoded, else the signal or exit status that ended it."""
    done = subprocess.run([sys.executable, "-c", LLAMA_TRIAL, str(path), str(n_ctx),
                           str(torch.get_num_threads()), str(prompt_tokens)], capture_output=True)
    if done.returncode == 0:
        return ""
    if done.returncode < 0:
        return signal.Signals(-done.returncode).name
    return f"exit status {done.returncode}"


def llama_cpp_decoders(model: nn.Module, directory: str, q8_0: bool = False,
                       prompt_tokens: int = 32) -> dict[str, Callable[[Tensor, int], Tensor]]:
    """llama.cpp's greedy decoding of `model`'s weights, written as GGUF files in F32 and BF16
    (and Q8_0: F32 quantized by llama.cpp) into `directory`, on as many threads as torch, by
    file type. Each file is first decoded in a process of its own: one whose trial crashes is
    left out, and a line says so."""
    try:
        import llama_cpp
    except ImportError:
        raise ImportError("--compare llama.cpp needs llama-cpp-python: pip install it") from None
    files = {name: save_gguf(model, Path(directory) / f"{name}.gguf", dtype=dtype)
             for name, dtype in (("F32", torch.float32), ("BF16", torch.bfloat16))}
    if q8_0:
        files["Q8_0"] = Path(directory) / "Q8_0.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
        if llama_cpp.llama_model_quantize(str(files["F32"]).encode(),
                                          str(files["Q8_0"]).encode(), params) != 0:
            raise RuntimeError("llama.cpp could not quantize the F32 file to Q8_0")
    n_ctx = model.config.n_ctx
    prompt_tokens = min(prompt_tokens, n_ctx - 4)  # the trial's prompt and its four tokens fit
    decoders = {}
    for name, path in files.items():
        if ended := llama_trial_ends(path, n_ctx, prompt_tokens):
            print(f"llama.cpp {name}: left out, a trial decode ended with {ended}", flush=True)
            continue
        llm = load_llama(str(path), n_ctx, torch.get_num_threads())

        def decode(prompt: Tensor, new: int, llm=llm) -> Tensor:
            llm.reset()
            tokens = itertools.islice(llm.generate(prompt[0].tolist(), top_k=1, temp=0.0), new)
            return torch.cat([prompt, torch.tensor([list(tokens)])], dim=1)

        decoders[name] = decode
    return decoders
