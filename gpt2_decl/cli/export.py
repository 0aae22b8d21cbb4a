"""`gpt2-decl export`: a checkpoint written in another format (GGUF, for llama.cpp)."""

import argparse
from pathlib import Path

from gpt2_decl.cli.common import resolve_dtype
from gpt2_decl.core.config import DTYPES
from gpt2_decl.core.model import GPT2
from gpt2_decl.storage.gguf import save_gguf

FORMATS = ("gguf",)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a checkpoint as GGUF (llama.cpp)",
        description="Write a checkpoint (or a training run's latest) with GPT-2's tokenizer as a "
        "GGUF file that llama.cpp and the tools built on it load.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoint directory, or a training run's")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE", help="the file to write")
    parser.add_argument("--format", default="gguf", choices=FORMATS, help="default: gguf")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="the matrices' dtype in the file (default: float32)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    model = GPT2.from_pretrained(args.checkpoint)
    path = save_gguf(model, args.out, dtype=resolve_dtype(args.dtype))
    print(f"wrote {path} ({path.stat().st_size / 2**20:,.1f} MiB, {args.dtype})")
