"""`gpt2-decl summary`: the parameter breakdown of a preset, tied and untied."""

import argparse

from gpt2_decl.config import GPT2Config
from gpt2_decl.summary import format_summary


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
