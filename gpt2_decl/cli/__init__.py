"""The `gpt2-decl` command (also `python -m gpt2_decl`): one subcommand per module here."""

import argparse
import importlib
import importlib.metadata
import sys

from gpt2_decl.speedups.gemv import KernelUnavailable
from gpt2_decl.storage.lock import DirectoryInUseError

# Each module defines add_parser(subparsers), which registers its subcommand and its handler.
SUBCOMMAND_MODULES = ("summary", "bench", "tune", "generate", "inspect", "train", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2-decl", description="GPT-2 as shape-annotated, declarative PyTorch."
    )
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('gpt2-decl')} "
                        f"(torch {importlib.metadata.version('torch')})")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"gpt2_decl.cli.{name}").add_parser(subparsers)
    return parser


# Errors that name what is wrong with the input: shown as one line, without a traceback.
CLEAR_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError, DirectoryInUseError,
                KernelUnavailable)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except CLEAR_ERRORS as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    sys.exit(main())
