"""Compiled mode: the whole model as one `torch.compile` graph, with checks kept at the boundary."""

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_decl.core.inputs import check_tokens
from gpt2_decl.core.kv_cache import KVCache
from gpt2_decl.core.typecheck import shape_checked


class CompiledGPT2:
    """A GPT-2 compiled with `fullgraph=True`. Call it like the model.

    Input validation and typechecked mode's checks of the tokens and logits run eagerly around
    the compiled graph; the per-layer checks are not traced into it (they cannot be: see
    `typecheck.py`). Parameters stay shared with `model`, so training it trains the model.
    """

    def __init__(self, model: nn.Module, compiled: Callable[..., Tensor], freeze: bool = False):
        self.model = model
        self.compiled = compiled
        self.freeze = freeze

    @shape_checked
    def __call__(
        self,
        tokens: Int[Tensor, "batch seq"],
        cache: KVCache | None = None,
        *,
        last_only: bool = False,
        check_values: bool = True,
    ) -> Float[Tensor, "batch seq_out vocab"]:
        model = self.model
        check_tokens(tokens, model.config, model.device, cache=cache, values=check_values)
        # Dynamo decides whether parameters may become constants from inductor's global config,
        # while it traces (torch.compile's `options` arrive too late for that), so freezing is
        # switched on around every call that may compile.
        with torch._inductor.config.patch(freezing=self.freeze):
            return self.compiled(tokens, cache, last_only=last_only, check_values=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def compile(
    model: nn.Module,
    *,
    mode: str | None = None,
    freeze: bool = False,
    dynamic: bool | None = None,
    backend: str | Callable = "inductor",
    options: dict[str, Any] | None = None,
) -> CompiledGPT2:
    """Compile `model` whole (`fullgraph=True`: a graph break is an error, never a slowdown).

    mode: torch.compile's mode ("default", "reduce-overhead", "max-autotune", ...).
    freeze: inductor's weight freezing, which folds weights into the graph as constants for
        inference (applies under `torch.no_grad()`): faster on CPU, but later weight updates are
        not seen, so never use it for training.
    dynamic: None compiles for the first sequence length and makes the sequence axis dynamic on
        the first change (one extra compilation, never one per length); True is dynamic at once.
    backend, options: torch.compile's (options: inductor settings, on top of those of `mode`).
    """
    if mode is not None and backend == "inductor":
        options = {**torch._inductor.list_mode_options(mode, dynamic), **(options or {})}
    compiled = torch.compile(
        model, fullgraph=True, dynamic=dynamic, backend=backend, options=options
    )
    return CompiledGPT2(model, compiled, freeze)
