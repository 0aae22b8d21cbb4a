"""Options that several subcommands share, and turning them into torch objects."""

import argparse

import torch

from gpt2_decl.config import DTYPES, GPT2Config


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
    from gpt2_decl import default_device

    device = torch.device(name) if name else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"error: --device {name} asked for CUDA, but torch.cuda.is_available() is False"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {name} asked for MPS, which this machine does not have")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    return DTYPES[name]
