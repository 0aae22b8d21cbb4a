"""`gpt2-decl tune`: measure which CPU speed-ups pay for a model here, and write the plan."""

import argparse
from pathlib import Path

from gpt2_decl.cli import common
from gpt2_decl.speedups import tune


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune", help="measure the CPU speed-ups for a model and write a plan",
        description="Time each CPU speed-up that applies to the model on this machine, for "
        "forward passes of --batch x --seq tokens and for generating --batch rows after prompts "
        "of --seq tokens, and write the plan of those that won as JSON (for generate --plan, "
        "gpt2_decl.compile(model, plan=...)). See docs/cpu-speedups.md.")
    parser.add_argument("--checkpoint", metavar="DIR", help="the weights (default: random)")
    common.add_model_arguments(parser)
    common.add_quantize_argument(parser)
    parser.add_argument("--batch", type=common.positive_int, default=1,
                        help="rows decoded (or sequences per forward pass) at once (default: 1)")
    parser.add_argument("--seq", type=common.positive_int, default=128,
                        help="tokens of a forward pass or a prompt (default: 128)")
    parser.add_argument("--decoding", action=argparse.BooleanOptionalAction, default=True,
                        help="also tune generation's decoding step (default: on; a minute or "
                        "two for GPT-2 small)")
    parser.add_argument("--out", type=Path, required=True, metavar="PATH",
                        help="the plan's JSON file")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    device = common.resolve_device(args.device or "cpu")
    model = common.quantized(common.load_model(args, device, common.resolve_dtype(args.dtype)),
                             args.quantize)
    plan = tune(model, batch=args.batch, seq=args.seq, decoding=args.decoding)
    plan.save(args.out)
    print(plan.describe())
    print(f"wrote {args.out}")
