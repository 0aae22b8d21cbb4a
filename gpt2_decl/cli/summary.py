"""`gpt2-decl summary`: the parameter breakdown of a preset, tied and untied."""

import argparse

from gpt2_decl.core.config import GPT2Config
from gpt2_decl.core.counting import count_parameters


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "summary",
        help="parameter counts by part, tied and untied",
        description="Print a preset's parameters by part, and why 163M and 124M both appear.",
    )
    parser.add_argument("--preset", default="small", choices=sorted(GPT2Config.PRESETS))
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    print(format_summary(GPT2Config.from_preset(args.preset), title=f"GPT-2 {args.preset}"))


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
