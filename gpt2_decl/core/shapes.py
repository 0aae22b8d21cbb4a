"""Every annotated shape checked without running the model: a typechecked forward (and
backward) pass over shape-only tensors on the meta device, and the table of shapes it binds.

The model's parameters are stood in for by meta tensors of their shapes and dtypes, so nothing
is computed or allocated and the weights are never copied; the data-dependent checks (token ids
in range, room in the cache) are the only ones skipped.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gpt2_decl.core.activations import Taps, all_names
from gpt2_decl.core.kv_cache import KVCache
from gpt2_decl.core.typecheck import CheckedCall, ShapeError, recording, typechecked


@dataclass(frozen=True)
class ShapeCheck:
    """What `check_shapes` found: every checked call, in order, the time it took, and (when
    asked) every named activation's shape."""

    calls: list[CheckedCall]
    seconds: float
    activations: dict[str, tuple[int, ...]] | None = None

    @property
    def axes(self) -> dict[str, set]:
        """Each axis name with the sizes it was bound to (one, unless functions reuse a name)."""
        bound: dict[str, set] = {}
        for call in self.calls:
            for axis, size in call.axes.items():
                bound.setdefault(axis, set()).add(tuple(size) if isinstance(size, list) else size)
        return bound


def check_shapes(
    model: nn.Module,
    batch: int,
    seq: int,
    *,
    cache: bool | int = False,
    training: bool = False,
    last_only: bool = False,
    activations: bool = False,
) -> ShapeCheck:
    """Check every annotated shape of `model` (a GPT2, real or built on the meta device) for a
    [batch, seq] input, on the meta device.

    cache: True checks the prompt's pass into a `KVCache` and a one-token step after it; an int
        checks one pass of `seq` tokens into a cache of that many positions.
    training: in training mode, with the backward pass: every gradient's shape must be its
        parameter's.
    activations: also capture every named activation of the (first) pass, which computes
        attention explicitly then, and give their shapes.
    Raises `ShapeError` naming the function and argument, as typechecked mode does, and
    ValueError for an impossible batch or seq.
    """
    config = model.config
    if cache and training:
        raise ValueError("cache and training check different passes (decoding is not trained "
                         "through a cache): check them one at a time")
    _check_size("batch", batch)
    _check_size("seq", seq)
    cache_len = seq + 1 if cache is True else (cache or None)
    if (cache_len or seq) > config.n_ctx or seq > (cache_len or seq):
        raise ValueError(
            f"seq={seq}{f' with a cache of {cache_len}' if cache_len else ''} does not fit the "
            f"context of {config.n_ctx} (n_ctx)"
        )
    start = time.perf_counter()
    stand_ins = {
        name: torch.empty_like(parameter, device="meta").requires_grad_(training)
        for name, parameter in model.named_parameters()
    }
    was_training = model.training
    model.train(training)
    try:
        with typechecked(), recording() as calls, torch.set_grad_enabled(training):
            kv = None if cache_len is None else KVCache(config, batch, cache_len,
                                                        dtype=model.dtype, device="meta")
            losses = []
            taps = Taps(capture=frozenset(all_names(config))) if activations else None
            captured = taps.captured if taps is not None else {}
            for pass_seq in _passes(seq, cache is True):
                tokens = torch.zeros(batch, pass_seq, dtype=torch.long, device="meta")
                arguments = (tokens,) if kv is None else (tokens, kv)
                logits = functional_call(model, stand_ins, arguments,
                                         {"last_only": last_only, "check_values": False,
                                          "taps": taps})
                taps = None  # the first pass's activations
                losses.append(logits.float().logsumexp(-1).mean())
            if training:
                _check_gradients(sum(losses), stand_ins)
    finally:
        model.train(was_training)
    shapes = None
    if activations:
        shapes = {name: tuple(value.shape) for name, value in captured.items()}
    return ShapeCheck(calls, time.perf_counter() - start, shapes)


def _passes(seq: int, prompt_then_step: bool) -> Iterator[int]:
    yield seq
    if prompt_then_step:
        yield 1


def _check_gradients(loss: Tensor, parameters: dict[str, Tensor]) -> None:
    """Run the backward pass; every gradient must have its parameter's shape."""
    try:
        gradients = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
    except RuntimeError as error:
        if "invalid gradient" not in str(error):
            raise
        # Autograd's own check of each function's gradients, in one line.
        raise ShapeError(f"backward pass: {str(error).splitlines()[0]}") from None
    for (name, parameter), gradient in zip(parameters.items(), gradients, strict=True):
        if gradient is not None and gradient.shape != parameter.shape:
            raise ShapeError(
                f"backward pass: the gradient of {name} has shape {tuple(gradient.shape)}, its "
                f"parameter {tuple(parameter.shape)}"
            )


def _check_size(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
