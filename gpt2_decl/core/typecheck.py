"""Typechecked mode: runtime shape and dtype checks for annotated functions, off by default.

A function decorated with `shape_checked` checks its arguments and result against their
jaxtyping annotations (with beartype) when the mode is on, binding axis names across them, and
costs one flag read when it is off. An argument annotated with a NamedTuple of tensors (a group
of weights) has each field checked against the field's annotation, under the same axis names.
Checks never run while `torch.compile` traces: jaxtyping's checks cannot be traced (they give
false errors under Dynamo), and skipping them there leaves no guard in the graph, so switching
the mode never recompiles.
"""

import contextlib
import functools
import inspect
import os
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import jaxtyping
import torch
from beartype.door import is_bearable

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


@dataclass(frozen=True)
class CheckedCall:
    """One checked call, as `recording` gives it: the function, and the shape of each annotated
    value (argument, weight-group field or result) with the axis sizes bound by the end."""

    function: str
    shapes: dict[str, tuple[int, ...]]
    hints: dict[str, object]
    axes: dict[str, int]


_recorders: list[list[CheckedCall]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[CheckedCall]]:
    """Collect every checked call made inside the block (typechecked mode must be on)."""
    calls: list[CheckedCall] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


F = TypeVar("F", bound=Callable)


def shape_checked(fn: F) -> F:
    """Check `fn`'s annotations on each call in typechecked mode, outside compile."""
    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    result_hint = hints.pop("return", None)
    # What to check, worked out once: each annotated argument, or each field of a group of
    # weights; an axis expression ("3*d_model") last, once the axes it uses are bound.
    slots = sorted(
        (slot for parameter in signature.parameters if parameter in hints
         for slot in _slots(parameter, hints[parameter])),
        key=lambda slot: slot.expression,
    )
    name = f"{fn.__module__}.{fn.__qualname__}()"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # is_compiling() comes first: it folds to a constant while tracing, so the flag is
        # never read (and never guarded on) inside a compiled graph.
        if torch.compiler.is_compiling() or not _Mode.enabled:
            return fn(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        with jaxtyping.jaxtyped("context"):
            checked: dict[str, tuple[object, object]] = {}
            for slot in slots:
                if slot.parameter in arguments:
                    label, value, hint = slot.read(arguments[slot.parameter])
                    _check(name, f"argument '{label}'", value, hint)
                    checked[label] = (value, hint)
            result = fn(*args, **kwargs)
            if result_hint is not None:
                for label, value, hint in _annotated_values("return", result, result_hint):
                    where = "return value" if label == "return" else f"return value {label[7:]}"
                    _check(name, where, value, hint)
                    checked[label] = (value, hint)
            if _recorders:
                _record(name, checked)
        return result

    # A code object of its own: Dynamo keeps its compiled graphs (and counts recompilations
    # against a limit) per code object, which would otherwise be shared by every checked function.
    wrapper.__code__ = wrapper.__code__.replace(co_name=fn.__name__, co_qualname=fn.__qualname__)
    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class _Slot:
    """One annotated value of a call: an argument, or a field of a NamedTuple argument."""

    parameter: str
    field: str | None
    hint: object
    group: type | None  # the NamedTuple class that `field` belongs to
    expression: bool

    def read(self, argument: object) -> tuple[str, object, object]:
        if self.field is None:
            return self.parameter, argument, self.hint
        if not isinstance(argument, self.group):  # not the group at all: check it as a whole
            return self.parameter, argument, self.group
        return f"{self.parameter}.{self.field}", getattr(argument, self.field), self.hint


def _slots(parameter: str, hint: object) -> list[_Slot]:
    fields = _named_tuple_fields(hint)
    if fields is None:
        return [_Slot(parameter, None, hint, None, _has_expression(hint))]
    return [_Slot(parameter, field, field_hint, hint, _has_expression(field_hint))
            for field, field_hint in fields.items()]


def _annotated_values(
    label: str, value: object, hint: object
) -> Iterator[tuple[str, object, object]]:
    """(label, value, hint) for `value`, or for each field of a NamedTuple of annotated tensors,
    or for each item of a fixed-length tuple hint (several results)."""
    fields = _named_tuple_fields(hint)
    if fields is not None and isinstance(value, tuple):
        for field, field_hint in fields.items():
            yield f"{label}.{field}", getattr(value, field), field_hint
    elif typing.get_origin(hint) is tuple and isinstance(value, tuple):
        items = typing.get_args(hint)
        if len(items) == len(value) and Ellipsis not in items:
            for index, (item, item_hint) in enumerate(zip(value, items, strict=True)):
                yield f"{label}[{index}]", item, item_hint
            return
        yield label, value, hint
    else:
        yield label, value, hint


def _named_tuple_fields(hint: object) -> dict[str, object] | None:
    if isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_fields"):
        return typing.get_type_hints(hint, include_extras=True)
    return None


def _has_expression(hint: object) -> bool:
    """Whether an axis of `hint` is an expression such as "3*d_model" (a leading "*" marks a
    variadic axis instead)."""
    tokens = (token.lstrip("*#") for array in _array_hints(hint) for token in array.dim_str.split())
    return any(set("*+-/") & set(token) for token in tokens)


def _check(function: str, where: str, value: object, hint: object) -> None:
    if is_bearable(value, hint):
        return
    raise ShapeError(
        f"{function}: {where} expected {_hint_name(hint)}, got {_describe(value)}: "
        f"{_reason(value, hint)} ({_bound_axes()})"
    )


def _array_hints(hint: object) -> list[Any]:
    """The jaxtyping array types in `hint` (itself, or the members of a union)."""
    union = typing.get_origin(hint) in (typing.Union, _UnionType)
    members = typing.get_args(hint) if union else (hint,)
    return [member for member in members if hasattr(member, "__instancecheck_str__")]


_UnionType = type(int | None)


def _reason(value: object, hint: object) -> str:
    """Why `value` fails `hint`, in jaxtyping's words where it is an array type."""
    arrays = _array_hints(hint)
    if not arrays:
        return f"a {type(value).__name__} is not a {_hint_name(hint)}"
    if not isinstance(value, torch.Tensor):
        return "this is not a torch.Tensor"
    reason = arrays[0].__instancecheck_str__(value).rstrip(".")
    # jaxtyping lists every dtype of the family; the annotation already names it.
    return re.sub(
        r"not any of \(.*\) as expected by the type hint", "not one the hint allows", reason
    )


def _hint_name(hint: object) -> str:
    if typing.get_origin(hint) in (typing.Union, _UnionType):
        members = typing.get_args(hint)
        return " | ".join(_hint_name(member) for member in members)
    return "None" if hint is type(None) else getattr(hint, "__name__", repr(hint))


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{dtype}[{', '.join(str(size) for size in value.shape)}]"
    return type(value).__name__


def _bound_axes() -> str:
    """The axis sizes bound so far in this call, as jaxtyping keeps them."""
    axes = _current_axes()
    if not axes:
        return "no axes bound yet"
    return "bound axes: " + " ".join(f"{axis}={size}" for axis, size in axes.items())


def _current_axes() -> dict[str, object]:
    single, variadic, _, _ = jaxtyping._storage.get_shape_memo()
    axes: dict[str, object] = {
        axis: size for axis, size in single.items() if not axis.startswith("~~")
    }
    for axis, (_, shape) in variadic.items():
        if not axis.startswith("~~"):
            axes[axis] = list(shape)
    return axes


def _record(function: str, checked: dict[str, tuple[object, object]]) -> None:
    shapes = {
        label: tuple(value.shape)
        for label, (value, _) in checked.items()
        if isinstance(value, torch.Tensor)
    }
    hints = {label: hint for label, (_, hint) in checked.items()}
    call = CheckedCall(function, shapes, hints, dict(_current_axes()))
    for calls in _recorders:
        calls.append(call)
