"""gpt2_decl: GPT-2 written as shape-annotated, declarative PyTorch."""

from gpt2_decl.core.compiling import CompiledGPT2, compile
from gpt2_decl.core.config import GPT2Config
from gpt2_decl.core.counting import ParameterCounts, count_parameters
from gpt2_decl.core.devices import default_device
from gpt2_decl.core.kv_cache import KVCache
from gpt2_decl.core.model import GPT2
from gpt2_decl.core.shape_table import shape_table
from gpt2_decl.core.shapes import ShapeCheck, check_shapes
from gpt2_decl.core.typecheck import ShapeError, is_typechecked, set_typechecked, typechecked
from gpt2_decl.speedups.quantize import quantize
from gpt2_decl.storage.huggingface import CheckpointError
from gpt2_decl.text.tokenizer import GPT2Tokenizer
from gpt2_decl.training.loop import train

__all__ = [
    "GPT2",
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
