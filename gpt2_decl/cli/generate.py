"""`gpt2-decl generate`: continue a text prompt, printing the text as the tokens come."""

import argparse
import codecs
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from gpt2_decl.cli.common import (
    add_model_arguments,
    add_quantize_argument,
    explained_out_of_memory,
    load_model,
    quantized,
    resolve_device,
    resolve_dtype,
)
from gpt2_decl.core.model import GPT2
from gpt2_decl.core.typecheck import is_typechecked, set_typechecked
from gpt2_decl.speedups.plan import Plan
from gpt2_decl.text.generation import generate, stream
from gpt2_decl.text.tokenizer import GPT2Tokenizer

DEFAULT_MAX_NEW_TOKENS = 50
# Tokens whose time includes one-off work (the prompt, then compiling the decode step).
STARTUP_TOKENS = 2


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="continue a prompt with sampled text",
        description=(
            "Continue --prompt with up to --max-new-tokens tokens, printed as they are produced, "
            "then the decoding speed; several prompts (--prompt more than once, or "
            "--prompts-file) are decoded together, as one batch, and printed in turn. Without "
            "--checkpoint the weights are random."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="the text to continue (repeatable)")
    source.add_argument("--prompt-file", metavar="PATH",
                        help="read one prompt, however long, from this file ('-': standard input)")
    source.add_argument("--prompts-file", metavar="PATH",
                        help="read one prompt per line from this file ('-': standard input)")
    parser.add_argument(
        "--checkpoint", default=None, metavar="DIR",
        help="a Hugging Face-layout GPT-2 directory (config.json + weights); default: random",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
        help=f"tokens to generate at most (default: {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="softmax temperature (default: 1)"
    )
    parser.add_argument(
        "--top-k", type=int, default=None, help="sample from the K most likely tokens"
    )
    parser.add_argument(
        "--top-p", type=float, default=None,
        help="sample from the most likely tokens whose probability reaches P (nucleus)",
    )
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument(
        "--compile", action="store_true", help="compile the decode step (slow start, fast tokens)"
    )
    parser.add_argument("--plan", type=Path, metavar="PATH",
                        help="compile the decode step with the CPU speed-ups of this plan "
                        "(from gpt2-decl tune, for the same model, --quantize and batch)")
    add_quantize_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    set_typechecked(args.typecheck or is_typechecked())
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    texts = read_prompts(args)
    tokenizer = GPT2Tokenizer()
    prompts = [tokenizer.encode(text) for text in texts]
    for index, ids in enumerate(prompts):
        if not ids:
            where = f"prompt {index + 1}" if len(prompts) > 1 else "the prompt"
            raise SystemExit(f"error: {where} is empty; give at least one character of text")
    plan = Plan.load(args.plan) if args.plan else None
    model = quantized(load_model(args, device, dtype), args.quantize)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   greedy=args.greedy, eos_id=tokenizer.eot_id, compile=args.compile, plan=plan,
                   generator=[torch.Generator(device=device).manual_seed(args.seed + row)
                              for row in range(len(prompts))])
    what = f"generating {args.max_new_tokens} tokens after {max(map(len, prompts))}"
    if len(prompts) > 1:
        with explained_out_of_memory(device, what + f", {len(prompts)} prompts at once"):
            print_batch(model, texts, prompts, args.max_new_tokens, options, tokenizer)
        return
    tokens = stream(model, torch.tensor(prompts, device=device), args.max_new_tokens, **options)
    text, ids = texts[0], prompts[0]

    print(text, end="", flush=True)
    times: list[float] = []
    what = f"generating {args.max_new_tokens} tokens after {len(ids)}"
    with explained_out_of_memory(device, what):
        for piece in stream_text(until(timed(tokens, times), tokenizer.eot_id), tokenizer):
            print(piece, end="", flush=True)
    print()
    print(speed_line(times), file=sys.stderr)


def print_batch(model: GPT2, texts: list[str], prompts: list[list[int]], max_new_tokens: int,
                options: dict, tokenizer: GPT2Tokenizer) -> None:
    """Decode the prompts as one batch, then print each with its continuation."""
    start = time.perf_counter()
    rows = generate(model, prompts, max_new_tokens, **options)
    seconds = time.perf_counter() - start
    for index, (text, prompt, row) in enumerate(zip(texts, prompts, rows, strict=True)):
        print(f"--- {index + 1}")
        print(text + tokenizer.decode(row[len(prompt):]))
    new = sum(len(row) - len(prompt) for prompt, row in zip(prompts, rows, strict=True))
    print(f"[{len(prompts)} prompts, {new} tokens in {seconds:.2f} s: {new / seconds:.1f} "
          "tokens/s]", file=sys.stderr)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts' texts: each --prompt, the one text of --prompt-file, or the lines of
    --prompts-file (a file, or '-' for standard input)."""
    if args.prompt is not None:
        return args.prompt
    name = args.prompt_file or args.prompts_file
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        flag = "--prompt-file" if args.prompt_file else "--prompts-file"
        raise SystemExit(f"error: {flag} {name}: {error}") from None
    if args.prompt_file:
        return [text]
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"error: --prompts-file {name} holds no prompt (no non-blank line)")
    return lines


def until(tokens: Iterable[int], eos_id: int) -> Iterator[int]:
    """The tokens up to and including the first `eos_id`."""
    for token in tokens:
        yield token
        if token == eos_id:
            return


def timed(tokens: Iterable[torch.Tensor], times: list[float]) -> Iterator[int]:
    """Each token id, appending to `times` the seconds from the start to its arrival."""
    start = time.perf_counter()
    for token in tokens:
        times.append(time.perf_counter() - start)
        yield int(token)


def stream_text(tokens: Iterable[int], tokenizer: GPT2Tokenizer) -> Iterator[str]:
    """The text of each token as it comes, the last with what the stream leaves undecodable.

    A token can end inside a UTF-8 character, so the bytes are decoded incrementally: a piece
    holds only whole characters (it is empty while a character is incomplete).
    """
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        yield text.decode(tokenizer.decode_bytes([token]))
    yield text.decode(b"", final=True)


def speed_line(times: list[float]) -> str:
    """Tokens/s overall, and after the first two tokens: the first waits for the prompt, the
    second for the compiled step's compilation (with --compile)."""
    if not times:
        return "[no tokens generated]"
    line = f"[{len(times)} tokens in {times[-1]:.2f} s: {len(times) / times[-1]:.1f} tokens/s"
    steady, startup_s = len(times) - STARTUP_TOKENS, times[min(STARTUP_TOKENS, len(times)) - 1]
    if steady > 0 and times[-1] > startup_s:
        rate = steady / (times[-1] - startup_s)
        line += f"; {rate:.1f} tokens/s after the first {STARTUP_TOKENS}"
    return line + "]"
