"""`gpt2-decl summary`: the parameter breakdown of a model, tied and untied, or with
`--shapes` the shape of every stage, read from the annotations on the meta device."""

import argparse

import torch

from gpt2_decl.cli.common import positive_int
from gpt2_decl.core.config import GPT2Config
from gpt2_decl.core.counting import count_parameters
from gpt2_decl.core.model import GPT2
from gpt2_decl.core.shape_table import shape_table

SIZES = ("n_layer", "n_head", "d_model", "n_ctx")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "summary",
        help="parameter counts by part (or, with --shapes, every stage's shape)",
        description="Print a model's parameters by part, and why 163M and 124M both appear; "
        "with --shapes, a table of every stage's shape for an input of --batch x --seq tokens, "
        "computed on the meta device (nothing is run or allocated).",
    )
    parser.add_argument("--preset", default="small", choices=sorted(GPT2Config.PRESETS))
    for name in SIZES:
        parser.add_argument(f"--{name.replace('_', '-')}", type=positive_int,
                            help=f"override the preset's {name}")
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="a checkpoint's architecture instead (reads config.json and the "
                        "tensor headers only)")
    parser.add_argument("--shapes", action="store_true", help="the table of shapes")
    parser.add_argument("--batch", type=positive_int, default=1, help="input rows (default: 1)")
    parser.add_argument("--seq", type=positive_int, help="input tokens (default: n_ctx)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    model, title = load(args)  # a bad size or checkpoint: a ValueError, shown by main
    if args.shapes:
        print(shape_table(model, args.batch, args.seq))
    else:
        print(format_summary(model.config, title=title))


def load(args: argparse.Namespace) -> tuple[GPT2, str]:
    """The model, built on the meta device, and its name."""
    if args.checkpoint:
        given = [f"--{name.replace('_', '-')}" for name in SIZES if getattr(args, name)]
        if given:
            raise ValueError(f"--checkpoint gives the architecture; drop {', '.join(given)}")
        return GPT2.from_pretrained(args.checkpoint, device="meta"), f"GPT-2 {args.checkpoint}"
    overrides = {name: getattr(args, name) for name in SIZES if getattr(args, name)}
    config = GPT2Config.from_preset(args.preset, **overrides)
    with torch.device("meta"):
        return GPT2(config), f"GPT-2 {args.preset}"


def format_summary(config: GPT2Config, title: str = "") -> str:
    counts = count_parameters(config)
    head = counts.parts["lm_head (tied to token_embedding)"]
    lines = [
        title or "GPT-2",
        f"  n_layer={config.n_layer} n_head={config.n_head} d_model={config.d_model} "
        f"d_head={config.d_head} n_ctx={config.n_ctx} vocab={config.vocab_size}",
        "",
        f"  {'part':<36}{'parameters':>15}",
    ]
    for name, count in counts.parts.items():
        if name.startswith("block."):
            name = f"  {name} (x{config.n_layer})"
        lines.append(f"  {name:<36}{count:>15,}")
    lines += [
        f"  {'each block':<36}{counts.per_block:>15,}",
        f"  {f'all {config.n_layer} blocks':<36}{counts.per_block * config.n_layer:>15,}",
        "",
        f"  {'total, tied (unique tensors)':<36}{counts.tied:>15,}",
        f"  {'total, counted untied':<36}{counts.untied:>15,}",
        "",
        f"  The output head reuses the token embedding ({head:,} parameters), so the model holds "
        f"{counts.tied / 1e6:.2f}M parameters.",
        f"  Tools that walk modules (torchinfo, state_dict()) see the matrix twice: "
        f"{counts.untied / 1e6:.2f}M - {head / 1e6:.2f}M = {counts.tied / 1e6:.2f}M.",
    ]
    return "\n".join(lines)
