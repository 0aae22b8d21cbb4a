"""Options that several subcommands share, and turning them into torch objects."""

import argparse

import torch

from gpt2_decl.core import devices
from gpt2_decl.core.config import DTYPES, GPT2Config


def add_model_arguments(parser: argparse.ArgumentParser, preset: bool = True) -> None:
    if preset:
        parser.add_argument(
            "--preset",
            default="small",
            choices=sorted(GPT2Config.PRESETS),
            help="GPT-2 size (default: small)",
        )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="parameter dtype"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    parser.add_argument(
        "--typecheck",
        action="store_true",
        help="check every annotated shape and dtype at runtime (typechecked mode)",
    )


def resolve_device(name: str | None) -> torch.device:
    """The device `--device` names, or exit with a one-line error saying why it cannot be."""
    try:
        return devices.resolve_device(name)
    except ValueError as error:
        raise SystemExit(f"error: --device: {error}") from None


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """The dtype `--dtype` names, checked against `device`."""
    dtype = DTYPES[name]
    if device is not None:
        try:
            devices.check_dtype_supported(dtype, device)
        except ValueError as error:
            raise SystemExit(f"error: --dtype: {error}") from None
    return dtype


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def positive_ints(text: str) -> list[int]:
    """An argparse type: a comma-separated list of integers >= 1 ("16,128,1024")."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 16,128,1024, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
