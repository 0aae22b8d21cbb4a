"""Compiled mode: the whole model as one `torch.compile` graph, with checks kept at the boundary."""

import contextlib
import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_decl.core import activations
from gpt2_decl.core.activations import ActivationCache, NameSpec, Taps
from gpt2_decl.core.inputs import check_tokens
from gpt2_decl.core.kv_cache import KVCache
from gpt2_decl.core.shapes import check_shapes
from gpt2_decl.core.tensors import stored_tensors
from gpt2_decl.core.typecheck import is_typechecked, shape_checked


class SpeedPlan(Protocol):
    """What compiling and generation ask of a speed-up plan (`gpt2_decl.speedups.Plan`): the core
    calls these and imports none of the speed-up code."""

    def check(self, model: nn.Module, batch: int | None = None, *, decoding: bool = False
              ) -> None:
        """Raise ValueError, in one line, if the plan was made for another kind of model, batch
        or machine, or (`decoding`) for forward passes only."""

    def compile_forward(self, model: nn.Module) -> "CompiledGPT2":
        """`model` compiled for forward passes with the plan's speed-ups."""

    def compile_decode_step(self, model: nn.Module) -> "CompiledGPT2":
        """`model` compiled for one-token cached decoding steps with the plan's speed-ups."""

    def prefill(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Where a prompt runs eagerly before decoding, with the plan's speed-ups."""


class CompiledGPT2:
    """A GPT-2 compiled with `fullgraph=True`. Call it like the model.

    Input validation runs eagerly before the compiled graph. In typechecked mode the graph is
    checked too, without running inside it (jaxtyping cannot be traced): `check_shapes` runs the
    typechecked model on shape-only tensors once per new input signature (batch, seq, cache,
    last_only, training, dtype, device), again whenever a graph is compiled (a weight's shape
    changed, say), and whenever the compiled call fails, to name the layer and argument at
    fault instead of an error from inside the graph. Parameters stay shared with `model`.
    """

    # Graphs compiled so far by the backends `compile` hands out, in this process.
    compilations = 0

    def __init__(self, model: nn.Module, backend: Callable, freeze: bool = False,
                 plan: SpeedPlan | None = None, **compile_kw):
        self.model, self.freeze, self.plan = model, freeze, plan
        self.checked: set[tuple] = set()
        self.compiled = torch.compile(model, fullgraph=True, backend=backend, **compile_kw)

    @shape_checked
    def __call__(
        self,
        tokens: Int[Tensor, "batch seq"],
        cache: KVCache | None = None,
        *,
        last_only: bool = False,
        check_values: bool = True,
        taps: Taps | None = None,
    ) -> Float[Tensor, "batch seq_out vocab"]:
        model = self.model
        check_tokens(tokens, model.config, model.device, cache=cache, values=check_values)
        if self.plan is not None:
            self.plan.check(model, tokens.shape[0])
        checking = is_typechecked()
        signature = None  # what the checks key on; nothing is worked out with the mode off
        if checking:
            signature = (tuple(tokens.shape), None if cache is None else cache.max_len,
                         last_only, model.training, torch.is_grad_enabled(), model.dtype,
                         model.device)
            if signature not in self.checked:
                self._check(signature)
        compilations = CompiledGPT2.compilations
        # Dynamo decides whether parameters may become constants from inductor's global config,
        # while it traces (torch.compile's `options` arrive too late for that).
        freezing = torch._inductor.config.patch(freezing=True) if self.freeze else None
        try:
            with freezing or contextlib.nullcontext():
                logits = self.compiled(tokens, cache, last_only=last_only, check_values=False,
                                       taps=taps)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            raise RuntimeError(
                f"this process compiled the model more than {torch._dynamo.config.recompile_limit}"
                " times (models, dtypes, batch sizes, with and without a cache): raise "
                "torch._dynamo.config.recompile_limit, or call torch._dynamo.reset() between uses"
            ) from None
        except Exception as error:
            if checking:
                self._check(signature)  # raises ShapeError if a shape is at fault
            if taps is not None and taps.functions and isinstance(
                    error, torch._dynamo.exc.TorchDynamoException):
                self._explain_function_patches(error, tokens, cache, last_only, taps)
            raise
        if checking and CompiledGPT2.compilations != compilations:
            self._check(signature)
        return logits

    def _explain_function_patches(self, error: Exception, tokens: Tensor,
                                  cache: KVCache | None, last_only: bool, taps: Taps) -> None:
        """Dynamo failed on a call with function patches: run it eagerly, where a function
        that gives the wrong thing fails in one line naming its activation; if it runs, the
        functions could not be traced: say so in one line."""
        with torch.compiler.set_stance("force_eager"):
            self.compiled(tokens, cache, last_only=last_only, check_values=False, taps=taps)
        reason = str(error).strip().splitlines()[0]
        raise RuntimeError(
            f"the function patches of {', '.join(taps.functions)} run eagerly but did not "
            f"compile into one graph ({reason}): patch with tensors or gpt2_decl.Patch, or "
            "run them on the model itself") from None

    def run_with_cache(self, tokens: Tensor, names: NameSpec = None, *,
                       patches: Mapping | None = None, **options) -> tuple[Tensor, ActivationCache]:
        """`GPT2.run_with_cache` through the compiled graph: what is captured are outputs of it,
        the patches' tensors inputs (new values or positions compile nothing new)."""
        return activations.run(self.model, self, tokens, names, patches, **options)

    def run_with_patches(self, tokens: Tensor, patches: Mapping, **options) -> Tensor:
        """`GPT2.run_with_patches` through the compiled graph."""
        return activations.run(self.model, self, tokens, (), patches, **options)[0]

    def _check(self, signature: tuple) -> None:
        (batch, seq), cache_len, last_only, training, grad = signature[:5]
        check_shapes(self.model, batch, seq, cache=cache_len or False,
                     training=training and grad, last_only=last_only)
        self.checked.add(signature)

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
    plan: SpeedPlan | None = None,
) -> CompiledGPT2:
    """Compile `model` whole (`fullgraph=True`: a graph break is an error, never a slowdown).

    Plain, it is torch.compile with inductor, the same graphs every run; `plan` (made by
    `gpt2_decl.speedups.tune`, or loaded) compiles it with the plan's speed-ups instead, and
    refuses a model, batch or machine the plan was not made for.

    mode: torch.compile's mode ("default", "reduce-overhead", "max-autotune", ...).
    freeze: inductor's weight freezing, which folds weights into the graph as constants for
        inference (applies under `torch.no_grad()`): faster on CPU, but later weight updates are
        not seen, so never use it for training. Compiling a model frozen again after its
        weights changed in place raises RuntimeError (Dynamo would hand back the old graphs).
    dynamic: None compiles for the first sequence length and makes the sequence axis dynamic on
        the first change (one extra compilation, never one per length); True is dynamic at once.
    backend, options: torch.compile's (options: inductor settings, on top of those of `mode`).
    Compiling the same model again with the same settings reuses the graphs compiled before.
    """
    if plan is not None:
        if (mode, freeze, dynamic, backend, options) != (None, False, None, "inductor", None):
            raise ValueError("a plan compiles the model its own way: pass plan= alone")
        plan.check(model)
        return plan.compile_forward(model)
    if freeze:
        _check_unchanged_since_frozen(model)
    if backend == "inductor":
        options = {**torch._inductor.list_mode_options(mode or "default", dynamic),
                   **(options or {})}
        # Frozen graphs are other graphs: a backend of their own, or Dynamo would hand back
        # the unfrozen ones compiled earlier for the same model.
        key: Hashable = ("inductor", freeze, tuple(sorted(options.items())))
        backend = _counted(key, lambda: _inductor(options))
    else:
        found = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        backend = _counted(found, lambda: found)
    return CompiledGPT2(model, backend, freeze, dynamic=dynamic)


def compile_with(model: nn.Module, backend: Callable, *, freeze: bool, plan: SpeedPlan
                 ) -> CompiledGPT2:
    """`model` compiled with a speed-up plan's `backend` (a torch.compile backend function,
    counted with the others), its calls checked against the plan."""
    if freeze:
        _check_unchanged_since_frozen(model)
    return CompiledGPT2(model, _counted(backend, lambda: backend), freeze, plan)


# The versions of each frozen model's weights (and of a quantized weight's inner tensors) when
# it was first compiled frozen: Dynamo hands the same frozen graphs back for the same model.
_frozen_versions: "weakref.WeakKeyDictionary[nn.Module, tuple[int, ...]]" = (
    weakref.WeakKeyDictionary())


def _check_unchanged_since_frozen(model: nn.Module) -> None:
    """Raise if `model`'s weights changed in place since graphs froze them: compiled again,
    it would be given those graphs, with the old weights in them."""
    versions = _versions(model)
    if _frozen_versions.setdefault(model, versions) != versions:
        raise RuntimeError(
            "this model's weights changed in place after a compiled step froze them "
            "(freeze=True); the frozen graphs would still use the old ones: compile a copy "
            "instead (copy.deepcopy(model))")


def _versions(model: nn.Module) -> tuple[int, ...]:
    return tuple(tensor._version for parameter in model.parameters()
                 for tensor in stored_tensors(parameter))


# One wrapper per backend and settings, for the life of the process: Dynamo reuses the graphs a
# backend compiled only when handed the very same backend object again.
_backends: dict[Hashable, Callable] = {}


def _counted(key: Hashable, make: Callable[[], Callable]) -> Callable:
    """The backend for `key` (made once), counting the graphs it compiles."""
    if key not in _backends:
        backend = make()

        def counting(graph_module: torch.fx.GraphModule, example_inputs: list) -> Any:
            CompiledGPT2.compilations += 1
            return backend(graph_module, example_inputs)

        _backends[key] = counting
    return _backends[key]


def _inductor(options: dict[str, Any]) -> Callable:
    """Inductor with `options` as a backend function (what torch.compile's "inductor" is)."""
    from torch._inductor.compile_fx import compile_fx

    def inductor(graph_module: torch.fx.GraphModule, example_inputs: list) -> Any:
        return compile_fx(graph_module, example_inputs, config_patches=options)

    return inductor
