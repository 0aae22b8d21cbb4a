"""gpt2_decl: GPT-2 written as shape-annotated, declarative PyTorch."""

from importlib import import_module as _import_module

from gpt2_decl.core.activations import ActivationCache, Patch
from gpt2_decl.core.compiling import CompiledGPT2, compile
from gpt2_decl.core.config import GPT2Config
from gpt2_decl.core.counting import ParameterCounts, count_parameters
from gpt2_decl.core.devices import default_device
from gpt2_decl.core.kv_cache import KVCache
from gpt2_decl.core.model import GPT2
from gpt2_decl.core.shape_table import shape_table
from gpt2_decl.core.shapes import ShapeCheck, check_shapes
from gpt2_decl.core.typecheck import ShapeError, is_typechecked, set_typechecked, typechecked

# Loaded on first use: importing the model loads no tokenizer, storage, training or speed-up code.
_ON_FIRST_USE = {
    "CheckpointError": "gpt2_decl.storage.huggingface",
    "GPT2Tokenizer": "gpt2_decl.text.tokenizer",
    "quantize": "gpt2_decl.speedups.quantize",
    "train": "gpt2_decl.training.loop",
}
_SUBPACKAGES = ("bench", "interpret", "speedups", "storage", "text", "training")

__all__ = [
    "GPT2",
    "ActivationCache",
    "Patch",
    "CheckpointError",
    "CompiledGPT2",
    "GPT2Config",
    "GPT2Tokenizer",
    "KVCache",
    "ParameterCounts",
    "ShapeCheck",
    "ShapeError",
    "check_shapes",
    "compile",
    "count_parameters",
    "default_device",
    "is_typechecked",
    "quantize",
    "set_typechecked",
    "shape_table",
    "train",
    "typechecked",
]


def __getattr__(name: str) -> object:
    if name in _ON_FIRST_USE:
        return getattr(_import_module(_ON_FIRST_USE[name]), name)
    if name in _SUBPACKAGES:
        return _import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_ON_FIRST_USE, *_SUBPACKAGES})
