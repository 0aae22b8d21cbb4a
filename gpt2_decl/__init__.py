"""gpt2_decl: GPT-2 written as shape-annotated, declarative PyTorch."""

import torch

from gpt2_decl.compiling import CompiledGPT2, compile
from gpt2_decl.config import GPT2Config
from gpt2_decl.model import GPT2
from gpt2_decl.summary import ParameterCounts, count_parameters
from gpt2_decl.tokenizer import GPT2Tokenizer
from gpt2_decl.training import train
from gpt2_decl.typecheck import ShapeError, is_typechecked, set_typechecked, typechecked


def default_device() -> torch.device:
    """The fastest device here: cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


__all__ = [
    "GPT2",
    "CompiledGPT2",
    "GPT2Config",
    "GPT2Tokenizer",
    "ParameterCounts",
    "ShapeError",
    "compile",
    "count_parameters",
    "default_device",
    "is_typechecked",
    "set_typechecked",
    "train",
    "typechecked",
]
