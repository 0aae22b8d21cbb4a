"""`gpt2-decl inspect`: pictures of one prompt's forward pass: attention patterns and the logit
lens, as PNG files."""

import argparse
import sys
from pathlib import Path

import torch

from gpt2_decl.cli import common
from gpt2_decl.interpret.pictures import draw_attention, draw_logit_lens, logit_lens
from gpt2_decl.text.tokenizer import GPT2Tokenizer


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect", help="draw a prompt's attention patterns and logit lens",
        description="Run one prompt through the model, capturing its activations, and draw "
        "the attention patterns of --layer (every head, the tokens on the axes) and the logit "
        "lens (each layer's most likely next token at each position) as PNG files in --out.")
    parser.add_argument("--checkpoint", metavar="DIR", help="the weights (default: random)")
    common.add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the text to look at")
    parser.add_argument("--layer", default="all",
                        help="the block whose patterns to draw, or 'all' (default)")
    parser.add_argument("--out", type=Path, default=Path("inspect"), metavar="DIR",
                        help="where the PNG files go (default: ./inspect)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    device = common.resolve_device(args.device)
    tokenizer = GPT2Tokenizer()
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise SystemExit("error: the prompt is empty; give at least one character of text")
    model = common.load_model(args, device, common.resolve_dtype(args.dtype, device))
    if len(ids) > model.config.n_ctx:
        raise SystemExit(f"error: the prompt is {len(ids)} tokens, longer than the context of "
                         f"{model.config.n_ctx} (n_ctx)")
    layers = _layers(args.layer, model.config.n_layer)
    names = ["blocks.*.resid_pre", "resid_final", *(f"blocks.{i}.pattern" for i in layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids], device=device), names)
    labels = [tokenizer.decode([token]) for token in ids]
    written = [draw_attention(cache[f"blocks.{i}.pattern"][0], labels,
                              args.out / f"attention-block-{i}.png",
                              f"block {i}: attention patterns (queries down, keys across)")
               for i in layers]
    written.append(draw_logit_lens(logit_lens(model, cache), labels,
                                   lambda token: tokenizer.decode([token]),
                                   args.out / "logit-lens.png",
                                   "logit lens: the most likely next token after each block"))
    for path in written:
        print(f"wrote {path}")
    if not args.checkpoint:
        print("(random weights: the pictures show an untrained model)", file=sys.stderr)


def _layers(text: str, n_layer: int) -> list[int]:
    if text == "all":
        return list(range(n_layer))
    try:
        layer = int(text)
    except ValueError:
        raise SystemExit(f"error: --layer must be a block number or 'all', got {text!r}") from None
    if not 0 <= layer < n_layer:
        raise SystemExit(f"error: --layer {layer}: the model has blocks 0 to {n_layer - 1}")
    return [layer]
