"""Typechecked mode: runtime shape and dtype checks for annotated functions, off by default.

Functions decorated with `shape_checked` check every jaxtyping annotation (through beartype)
when the mode is on, and cost one flag read when it is off. Checks never run while
`torch.compile` traces: jaxtyping's checks are not traceable (they give false errors under
Dynamo), and skipping them there leaves no guard in the compiled graph, so switching the mode
never recompiles.
"""

import contextlib
import functools
import inspect
import os
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

import jaxtyping
import torch
from beartype import beartype

ENV_VAR = "GPT2_DECL_TYPECHECK"
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


class ShapeError(TypeError):
    """A tensor's shape or dtype disagrees with the annotation of the function it was given to."""


class _Mode:
    enabled: bool = os.environ.get(ENV_VAR, "").strip().lower() in _TRUE_WORDS


def is_typechecked() -> bool:
    """Whether typechecked mode is on now."""
    return _Mode.enabled


def set_typechecked(enabled: bool) -> None:
    """Switch typechecked mode on or off for the whole process."""
    _Mode.enabled = bool(enabled)


@contextlib.contextmanager
def typechecked(enabled: bool = True) -> Iterator[None]:
    """Turn typechecked mode on (or off) inside a `with` block, restoring it afterwards."""
    before = _Mode.enabled
    _Mode.enabled = bool(enabled)
    try:
        yield
    finally:
        _Mode.enabled = before


F = TypeVar("F", bound=Callable)


def shape_checked(fn: F) -> F:
    """Check `fn`'s jaxtyping annotations on each call in typechecked mode, outside compile."""
    checked = jaxtyping.jaxtyped(typechecker=beartype)(fn)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # is_compiling() comes first: it folds to a constant while tracing, so the flag is
        # never read (and never guarded on) inside a compiled graph.
        if not torch.compiler.is_compiling() and _Mode.enabled:
            try:
                return checked(*args, **kwargs)
            except jaxtyping.TypeCheckError as error:
                bound = signature.bind(*args, **kwargs).arguments
                raise ShapeError(_one_line(fn, error, bound)) from None
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{dtype}[{', '.join(str(size) for size in value.shape)}]"
    return type(value).__name__


def _one_line(fn: Callable, error: Exception, arguments: dict) -> str:
    """Condense jaxtyping's multi-line report (and beartype's reason beneath it) into one line."""
    text = str(error)
    argument = re.search(r"typechecking parameter '(\w+)'", text)
    expected = re.search(r"Expected type: (?:<class ')?(.*?)(?:'>)?\.?$", text, re.MULTILINE)
    actual = re.search(r"Actual value: (\S+)", text)
    bound_axes = text.partition("are as follows.")[2]
    axes = re.sub(r"torch\.Size\((\[.*?\])\)", r"\1", bound_axes).split("\n")
    axes = [axis for axis in axes if axis]
    reason = _root_reason(error)

    if argument:
        where = f"argument '{argument.group(1)}'"
        got = _describe(arguments.get(argument.group(1)))
    else:
        where = "return value"
        got = _expand_summary(actual.group(1)) if actual else "an unknown value"
    line = f"{fn.__module__}.{fn.__qualname__}(): {where}"
    if expected:
        line += f" expected {expected.group(1)}"
    line += f", got {got}"
    if reason:
        line += f": {reason}"
    line += f" (bound axes: {' '.join(axes)})" if axes else " (no axes bound yet)"
    return line


_SHORT_DTYPE_PREFIXES = {"bf": "bfloat", "f": "float", "i": "int", "u": "uint", "c": "complex"}


def _expand_summary(summary: str) -> str:
    """jaxtyping's "f32[2,4](torch)" in the same words as arguments get: "float32[2, 4]"."""
    match = re.fullmatch(r"([a-z]+)(\d*)\[([\d,]*)\].*", summary)
    if not match:
        return summary
    prefix, bits, sizes = match.groups()
    dtype = _SHORT_DTYPE_PREFIXES.get(prefix, prefix) + bits
    return f"{dtype}[{', '.join(sizes.split(','))}]" if sizes else f"{dtype}[]"


def _root_reason(error: BaseException) -> str:
    """beartype's explanation ("the size of dimension seq is 8 which does not equal ...")."""
    while error.__cause__ is not None:
        error = error.__cause__
    reason = str(error).rpartition(", as ")[2].strip().rstrip(".")
    # beartype lists every accepted dtype; the annotation already names the dtype family.
    return re.sub(
        r"not any of \(.*\) as expected by the type hint", "not one the hint allows", reason
    )
