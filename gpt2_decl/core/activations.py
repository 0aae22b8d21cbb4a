"""Named activations: what a forward pass computes at each site, captured and patched by name.

A block's sites, in the order it computes them, and the model's before and after the blocks,
each with its axes (named as in the layers' annotations). A full name is `blocks.{i}.{site}`
for a block's, the site itself for the model's. `Taps` carries, for one call, which names to
capture and how to patch which; the model calls `Taps.site` at every site, and without taps it
computes exactly what it computes plainly. Under torch.compile what is captured becomes outputs
of the one graph, and the patches' tensors its inputs: new patch values or positions reuse the
graph. See docs/activations.md.
"""

import difflib
import fnmatch
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gpt2_decl.core.config import GPT2Config
from gpt2_decl.core.inputs import check_tokens, left_padding_start
from gpt2_decl.core.kv_cache import KVCache
from gpt2_decl.core.typecheck import ShapeError, is_typechecked

BLOCK_SITES = {
    "resid_pre": "batch seq d_model",       # the residual stream into the block
    "attn_in": "batch seq d_model",         # after the first LayerNorm
    "q": "batch head seq d_head",
    "k": "batch head seq d_head",
    "v": "batch head seq d_head",
    "scores": "batch head seq kv_seq",      # before the softmax (hidden keys: -inf)
    "pattern": "batch head seq kv_seq",     # after the softmax
    "z": "batch head seq d_head",           # each head's output, before the projection
    "attn_out": "batch seq d_model",        # what attention adds to the residual stream
    "resid_mid": "batch seq d_model",       # resid_pre + attn_out
    "mlp_in": "batch seq d_model",          # after the second LayerNorm
    "mlp_pre": "batch seq d_mlp",           # before GELU
    "mlp_post": "batch seq d_mlp",          # after GELU
    "mlp_out": "batch seq d_model",         # what the MLP adds to the residual stream
    "resid_post": "batch seq d_model",      # resid_mid + mlp_out
}
BEFORE_BLOCKS = {"embed": "batch seq d_model", "pos_embed": "batch seq d_model"}
AFTER_BLOCKS = {
    "resid_final": "batch seq d_model",     # the residual stream out of the last block
    "ln_final": "batch seq d_model",        # after the final LayerNorm
    "logits": "batch seq vocab",
}
# Sites that exist only where attention is computed explicitly, not by the fused kernel.
PATTERN_SITES = ("scores", "pattern")
# TransformerLens' hook names for the same activations, in the same layout.
ALIASES = {
    "hook_embed": "embed", "hook_pos_embed": "pos_embed",
    "ln_final.hook_normalized": "ln_final",
    **{f"blocks.{{i}}.{alias}": f"blocks.{{i}}.{site}" for alias, site in {
        "hook_resid_pre": "resid_pre", "ln1.hook_normalized": "attn_in",
        "attn.hook_attn_scores": "scores", "attn.hook_pattern": "pattern",
        "hook_attn_out": "attn_out", "hook_resid_mid": "resid_mid",
        "ln2.hook_normalized": "mlp_in", "mlp.hook_pre": "mlp_pre", "mlp.hook_post": "mlp_post",
        "hook_mlp_out": "mlp_out", "hook_resid_post": "resid_post"}.items()},
}
# TransformerLens' q, k, v and z put the position before the head (batch pos head_index
# d_head): not aliases, since an index meant for one layout silently picks another element
# of the other; these names are refused, naming ours.
OTHER_LAYOUT = {"attn.hook_q": "q", "attn.hook_k": "k", "attn.hook_v": "v", "attn.hook_z": "z"}


def all_names(config: GPT2Config) -> list[str]:
    """Every activation's full name, in the order a forward pass computes them."""
    return [*BEFORE_BLOCKS,
            *(f"blocks.{i}.{site}" for i in range(config.n_layer) for site in BLOCK_SITES),
            *AFTER_BLOCKS]


def site_of(name: str) -> str:
    """The site a full name is of ("blocks.3.resid_post" -> "resid_post")."""
    return name.rsplit(".", 1)[-1]


def layer_of(name: str) -> int | None:
    """The block a full name is in; None for the model's own sites."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


def axes_of(name: str) -> list[str]:
    """The activation's axes, by name."""
    site = site_of(name)
    return (BLOCK_SITES.get(site) or BEFORE_BLOCKS.get(site) or AFTER_BLOCKS[site]).split()


def shape_of(name: str, config: GPT2Config, batch: int, seq: int, kv_seq: int | None = None
             ) -> tuple[int, ...]:
    """The activation's shape in a forward pass of [batch, seq] tokens (kv_seq keys)."""
    sizes = {"batch": batch, "seq": seq, "kv_seq": seq if kv_seq is None else kv_seq,
             "d_model": config.d_model, "head": config.n_head, "d_head": config.d_head,
             "d_mlp": config.d_mlp, "vocab": config.vocab_size}
    return tuple(sizes[axis] for axis in axes_of(name))


NameSpec = str | Iterable[str] | Callable[[str], bool] | None


def resolve(names: NameSpec, config: GPT2Config, what: str = "capture") -> list[str]:
    """The full names `names` stands for, in computing order: None for all, a name, an alias,
    a glob ("blocks.*.resid_post"), a list of those, or a predicate on full names. A name or
    glob that matches nothing is a ValueError naming the closest valid names."""
    valid = all_names(config)
    if names is None:
        return valid
    if callable(names):
        chosen = {name for name in valid if names(name)}
        if not chosen:
            raise ValueError(f"the predicate given to {what} accepts no activation name")
        return [name for name in valid if name in chosen]
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, Iterable):
        raise TypeError(f"names to {what}: expected a name, a glob, a list of them, a predicate "
                        f"or None, got {type(names).__name__}")
    chosen = set()
    for pattern in names:
        if not isinstance(pattern, str):
            raise TypeError(f"activation names are strings, got {type(pattern).__name__}")
        found = _matches(pattern, valid, config)
        if not found:
            raise ValueError(_unknown(pattern, valid, config, what))
        chosen |= set(found)
    return [name for name in valid if name in chosen]


def _matches(pattern: str, valid: list[str], config: GPT2Config) -> list[str]:
    other_layout = _other_layout(pattern)
    if other_layout and fnmatch.filter(valid, other_layout[1]):
        raise ValueError(other_layout[0])
    pattern = _unaliased(pattern)
    if any(character in pattern for character in "*?["):
        return fnmatch.filter(valid, pattern)
    return [pattern] if pattern in valid else []


def _other_layout(name: str) -> tuple[str, str] | None:
    """For TransformerLens' name of an activation in another layout: why it is not ours, and
    ours; None for any other name."""
    match = re.fullmatch(r"blocks\.([^.]+)\.(.+)", name)
    if not match or match.group(2) not in OTHER_LAYOUT:
        return None
    site = OTHER_LAYOUT[match.group(2)]
    ours = f"blocks.{match.group(1)}.{site}"
    return (f"{name} is TransformerLens' {site}, laid out batch pos head_index d_head; ours is "
            f"{ours}, laid out batch head seq d_head (.transpose(1, 2) turns one into the "
            "other)"), ours


def _unaliased(name: str) -> str:
    """Our name for a TransformerLens hook name (any other name as it is)."""
    if name in ALIASES:
        return ALIASES[name]
    match = re.fullmatch(r"blocks\.([^.]+)\.(.+)", name)
    if match and f"blocks.{{i}}.{match.group(2)}" in ALIASES:
        return ALIASES[f"blocks.{{i}}.{match.group(2)}"].replace("{i}", match.group(1))
    return name


def _unknown(pattern: str, valid: list[str], config: GPT2Config, what: str) -> str:
    layer = layer_of(pattern) if re.fullmatch(r"blocks\.\d+\..+", pattern) else None
    if layer is not None and layer >= config.n_layer:
        return (f"{what}: {pattern!r} names block {layer}, but the model has blocks 0 to "
                f"{config.n_layer - 1}")
    aliases = [alias.replace("{i}", str(i)) for alias in ALIASES
               for i in (range(config.n_layer) if "{i}" in alias else [0])]
    close = difflib.get_close_matches(pattern, valid + aliases, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (f"{what}: no activation is named {pattern!r}{hint} (gpt2-decl summary --shapes "
            "lists every name)")


@dataclass(frozen=True)
class Patch:
    """A patch of an activation: `value` (a tensor that broadcasts to the activation, or a
    number) put in at `positions` (of the sequence axis; int, list, slice or booleans, per row
    as [batch, seq]) and `heads` (of the head axis; the same kinds), everywhere else the
    activation kept. With neither, the whole activation is replaced."""

    value: Tensor | float
    positions: object = None
    heads: object = None


PatchSpec = Tensor | Callable[[Tensor], Tensor] | Patch


@dataclass
class Taps:
    """What one forward pass captures and patches, by full name. The names are fixed for a
    compiled graph; the tensors (patch values, masks, capture indices) are its inputs."""

    capture: frozenset[str] = frozenset()
    # name -> (value, mask): put value in where mask is True
    replace: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    # name -> a function of the activation
    functions: dict[str, Callable[[Tensor], Tensor]] = field(default_factory=dict)
    # name -> a zero tensor that requires grad, added at the site: its gradient is the metric's
    deltas: dict[str, Tensor] = field(default_factory=dict)
    positions: Tensor | None = None  # the sequence positions kept of what is captured
    dtype: torch.dtype | None = None  # captured tensors' dtype
    # name -> the shape its activation must have after its patches (typechecked mode, eager)
    expected: dict[str, tuple[int, ...]] = field(default_factory=dict)
    captured: dict[str, Tensor] = field(default_factory=dict)

    def explicit_attention(self, layer: int) -> bool:
        """Whether block `layer` computes attention explicitly: its scores or pattern are
        captured or patched."""
        wanted = {f"blocks.{layer}.{site}" for site in PATTERN_SITES}
        return bool(wanted & (self.capture | set(self.replace) | set(self.functions)
                              | set(self.deltas)))

    def site(self, name: str, value: Tensor) -> Tensor:
        """The activation `name` as the rest of the pass sees it, patched where asked; kept
        where captured."""
        if name in self.replace:
            patch, mask = self.replace[name]
            value = torch.where(mask, patch, value)
        if name in self.functions:
            value = _function_result(name, self.functions[name](value), value)
        if name in self.deltas:
            value = value + self.deltas[name]
        if name in self.expected and not torch.compiler.is_compiling() \
                and tuple(value.shape) != self.expected[name]:
            raise ShapeError(f"{name}: expected {' '.join(axes_of(name))} = "
                             f"{list(self.expected[name])}, got {list(value.shape)}")
        if name in self.capture:
            kept = value if self.positions is None else value.index_select(
                axes_of(name).index("seq"), self.positions)
            self.captured[name] = kept if self.dtype is None else kept.to(self.dtype)
        return value

    def sites(self, layer: int) -> Callable[[str, Tensor], Tensor]:
        """Block `layer`'s sites by their short names."""
        return lambda site, value: self.site(f"blocks.{layer}.{site}", value)

    @property
    def empty(self) -> bool:
        return not (self.capture or self.replace or self.functions or self.deltas)


def _function_result(name: str, result: object, activation: Tensor) -> Tensor:
    """What a function patch of `name` gave, if it is a tensor like the activation it was
    given (its shape, dtype and device); a one-line error naming `name` otherwise."""
    if not isinstance(result, Tensor):
        raise TypeError(f"patch of {name}: the function must return a tensor, got "
                        f"{type(result).__name__}")
    if result.shape != activation.shape:
        raise ShapeError(f"patch of {name}: the function must return {' '.join(axes_of(name))} "
                         f"= {list(activation.shape)}, got {list(result.shape)}")
    if result.dtype != activation.dtype or result.device != activation.device:
        raise TypeError(f"patch of {name}: the function must return {_dtype(activation.dtype)} "
                        f"on {activation.device}, got {_dtype(result.dtype)} on {result.device}")
    return result


def plain_site(name: str, value: Tensor) -> Tensor:
    """A site without taps: the activation as it is."""
    return value


def patch_tensors(name: str, patch: PatchSpec, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> tuple[Tensor, Tensor] | Callable:
    """A patch as what `Taps` takes: (value, mask) checked against the activation's shape and
    dtype, or the function as it is; a ValueError or TypeError naming `name` otherwise. The
    value has the activation's shape and the mask one shape per activation (its batch, head
    and seq axes, 1 elsewhere) whatever the patch's positions and heads: a compiled graph
    takes another patch of the same activation as new inputs, not as a new graph."""
    if callable(patch) and not isinstance(patch, Tensor | Patch):
        return patch
    if isinstance(patch, Tensor):
        patch = Patch(patch)
    if not isinstance(patch, Patch):
        raise TypeError(f"patch of {name}: expected a tensor, a function of the activation or "
                        f"gpt2_decl.Patch, got {type(patch).__name__}")
    value = patch.value
    if not isinstance(value, Tensor):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"patch of {name}: its value must be a tensor or a number, got "
                            f"{type(value).__name__}")
        value = torch.tensor(float(value), dtype=dtype, device=device)
    if value.dtype != dtype:
        raise TypeError(f"patch of {name}: expected dtype {_dtype(dtype)}, got "
                        f"{_dtype(value.dtype)}")
    if value.device != device:
        raise ValueError(f"patch of {name}: the value is on {value.device}, the model on {device}")
    if value.dim() > len(shape) or not _broadcasts(tuple(value.shape), shape):
        raise ShapeError(f"patch of {name}: expected a value of shape {list(shape)} "
                         f"({' '.join(axes_of(name))}) or one that broadcasts to it, got "
                         f"{list(value.shape)}")
    axes = axes_of(name)
    masked = [size if axis in ("batch", "head", "seq") else 1 for axis, size in zip(
        axes, shape, strict=True)]
    mask = torch.ones(masked, dtype=torch.bool, device=device)
    if patch.positions is not None:
        mask &= _axis_mask(name, "positions", patch.positions, axes, shape, "seq", device)
    if patch.heads is not None:
        if "head" not in axes:
            raise ValueError(f"patch of {name}: heads= is for activations with a head axis "
                             f"(q, k, v, scores, pattern, z), not {' '.join(axes)}")
        mask &= _axis_mask(name, "heads", patch.heads, axes, shape, "head", device)
    return value.expand(shape).contiguous(), mask


def _axis_mask(name: str, what: str, chosen: object, axes: list[str], shape: tuple[int, ...],
               axis: str, device: torch.device) -> Tensor:
    """A boolean mask over `axis` (and the batch, for per-row choices) that broadcasts to the
    activation: True where `chosen` picks."""
    size, batch = shape[axes.index(axis)], shape[0]
    if not isinstance(chosen, Tensor) and hasattr(chosen, "tolist"):  # a NumPy array
        chosen = chosen.tolist()
    if isinstance(chosen, list | tuple) and chosen and all(
            isinstance(row, list | tuple) for row in chosen):  # booleans per row
        chosen = torch.tensor(chosen, device=device)
    if isinstance(chosen, Tensor) and chosen.dtype == torch.bool and chosen.dim() == 2:
        if tuple(chosen.shape) != (batch, size):
            raise ShapeError(f"patch of {name}: {what} as booleans per row must have shape "
                             f"[{batch}, {size}] (batch {axis}), got {list(chosen.shape)}")
        picked = chosen.to(device)
    else:
        indices = _indices(chosen, size, f"patch of {name}: {what}", axis)
        if not indices:
            raise ValueError(f"patch of {name}: {what} {chosen!r} pick none of the {size} "
                             f"along {axis}")
        picked = torch.zeros(size, dtype=torch.bool, device=device)
        picked[indices] = True
    # To the activation's axes: batch first (if per row), the chosen axis in its place.
    view = [1] * len(axes)
    view[axes.index(axis)] = size
    if picked.dim() == 2:
        view[0] = batch
    return picked.reshape(view)


def _broadcasts(value: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    return all(a in (1, b) for a, b in zip(reversed(value), reversed(shape), strict=False))


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _indices(chosen: object, size: int, what: str, axis: str) -> list[int]:
    """The indices, from 0, that `chosen` picks along an axis of `size`: an int, a slice, ints
    (a list or an integer tensor, negative from the end) or booleans (one per index, True where
    picked); a one-line error beginning with `what` for anything else or out of range."""
    if isinstance(chosen, slice):
        if chosen.step == 0:
            raise ValueError(f"{what} {chosen} has a step of 0")
        return list(range(size))[chosen]
    if isinstance(chosen, Tensor):
        if chosen.dim() > 1 or chosen.dtype.is_floating_point or chosen.dtype.is_complex:
            raise TypeError(f"{what} as a tensor must be one axis of integers or booleans, got "
                            f"{_dtype(chosen.dtype)}{list(chosen.shape)}")
        chosen = chosen.tolist()
    elif hasattr(chosen, "tolist"):  # a NumPy array or scalar
        chosen = chosen.tolist()
    if isinstance(chosen, Iterable) and not isinstance(chosen, Sequence | str | bytes):
        raise TypeError(f"{what} must be an int, a list of ints, a slice or booleans, got "
                        f"{type(chosen).__name__}")
    entries = list(chosen) if isinstance(chosen, Sequence) and not isinstance(
        chosen, str | bytes) else [chosen]
    # NumPy's and torch's scalars as Python's (a NumPy bool is no Python bool).
    entries = [entry.item() if hasattr(entry, "item") else entry for entry in entries]
    if entries and all(isinstance(entry, bool) for entry in entries):
        if len(entries) != size:
            raise ShapeError(f"{what} as booleans must be one per {axis} ({size}), got "
                             f"{len(entries)}")
        return [index for index, entry in enumerate(entries) if entry]
    indices = []
    for entry in entries:
        try:
            if isinstance(entry, bool):
                raise TypeError
            index = operator.index(entry)
        except TypeError:
            raise TypeError(f"{what} must be an int, a list of ints, a slice or booleans, got "
                            f"{entry!r}") from None
        if not -size <= index < size:
            raise ValueError(f"{what} {index} is out of range for {axis} of size {size}")
        indices.append(index % size)
    return indices


def positions_index(positions: object, seq: int, device: torch.device) -> Tensor:
    """The sequence positions to keep of what is captured, as an index tensor."""
    indices = _indices(positions, seq, "positions", "seq")
    if not indices:
        raise ValueError(f"positions {positions!r} pick no position of a sequence of {seq}")
    return torch.tensor(indices, dtype=torch.long, device=device)


class ActivationCache(Mapping[str, Tensor]):
    """The activations a run captured, by full name (TransformerLens' names work too), with
    the views people use: a site stacked across blocks, the residual stream accumulated block
    by block, and each head's share of attn_out."""

    def __init__(self, activations: dict[str, Tensor], model, deltas: dict[str, Tensor]):
        self._activations, self._model, self._deltas = activations, model, deltas

    def __getitem__(self, name: str) -> Tensor:
        key = self._key(name)
        if key not in self._activations:
            valid = list(self._activations)
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"{name!r} was not captured{hint}")
        return self._activations[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._activations)

    @staticmethod
    def _key(name: str) -> str:
        if other_layout := _other_layout(name):
            raise KeyError(other_layout[0])
        return _unaliased(name)

    def __len__(self) -> int:
        return len(self._activations)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {', '.join(list(self)[:4])}...)"

    def stack(self, site: str) -> Tensor:
        """A block site captured in every block, stacked: [layer, *its axes]."""
        layers = range(self._model.config.n_layer)
        return torch.stack([self[f"blocks.{layer}.{site}"] for layer in layers])

    def accumulated_resid(self) -> Tensor:
        """The residual stream into each block and out of the last: [n_layer + 1, batch, seq,
        d_model] (needs every block's resid_pre and resid_final)."""
        return torch.stack([*self.stack("resid_pre"), self["resid_final"]])

    def head_contributions(self, layer: int) -> Tensor:
        """What each head of block `layer` adds to the residual stream: its z through its
        slice of the output projection, [batch, seq, head, d_model]; their sum, plus the
        projection's bias, is attn_out (needs the block's z)."""
        config = self._model.config
        z = self[f"blocks.{layer}.z"]
        w_out = self._model.blocks[layer].attn.proj.weight  # [d_model, head * d_head]
        slices = w_out.reshape(config.d_model, config.n_head, config.d_head).to(z)
        return torch.einsum("bhsd,mhd->bshm", z, slices)

    def grad(self, name: str) -> Tensor:
        """The gradient, with respect to the activation, of what `backward` was called on
        (run_with_cache(..., gradients=True))."""
        key = self._key(name)
        if key not in self._deltas:
            raise KeyError(f"no gradient of {name!r}: capture it with gradients=True")
        if self._deltas[key].grad is None:
            raise RuntimeError(f"no gradient of {name!r} yet: call .backward() on a metric of "
                               "this run's logits first")
        return self._deltas[key].grad


def run(
    model,
    forward: Callable,
    tokens: Tensor,
    names: NameSpec | list = (),
    patches: Mapping[str, PatchSpec] | None = None,
    *,
    attention_mask: Tensor | None = None,
    cache=None,
    positions: object = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    gradients: bool = False,
    last_only: bool = False,
    check_values: bool = True,
) -> tuple[Tensor, ActivationCache]:
    """One forward pass of `tokens` through `forward` (the model, or it compiled) with the
    activations `names` captured (kept in `dtype`, on `device`, at `positions` only) and
    `patches` put in: see `GPT2.run_with_cache`. Bad names or patches are refused in one line,
    before any work."""
    config = model.config
    if last_only:
        raise ValueError("capture and patching run every position: drop last_only (keep only "
                         "the last position's activations with positions=-1)")
    check_tokens(tokens, config, model.device, cache=cache, values=check_values)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype of the captures: expected a torch.dtype (torch.float16, ...), "
                        f"got {dtype!r}")
    batch, seq = tokens.shape
    captured = resolve(names, config, "capture") if names != () else []
    patched = {name: patch for pattern, patch in (patches or {}).items()
               for name in resolve(pattern, config, "patch")}
    wanted = [name for name in [*captured, *patched] if site_of(name) in PATTERN_SITES]
    if wanted and cache is not None and int(cache.length) > 0:  # (an empty one: a prompt)
        raise ValueError(f"{wanted[0]}: a pass that continues a cache has no full sequence "
                         "to take a pattern over; run the whole sequence without a cache")
    if attention_mask is not None:
        if cache is not None:
            raise ValueError("attention_mask pads a whole batch of prompts; a cache continues "
                             "one: give one of them")
        start = left_padding_start(attention_mask, tokens)
        if start is not None:  # the prompts' own positions and keys, as generation has them
            cache = KVCache(config, batch, seq, dtype=model.dtype, device=model.device,
                            start=start)
    kv_seq = seq if cache is None else cache.max_len
    taps = Taps(capture=frozenset(captured), dtype=dtype)
    for name, patch in patched.items():
        shape = shape_of(name, config, batch, seq, kv_seq)
        made = patch_tensors(name, patch, shape, model.dtype, model.device)
        if callable(made):
            taps.functions[name] = made
        else:
            taps.replace[name] = made
    if positions is not None:
        taps.positions = positions_index(positions, seq, model.device)
    if is_typechecked():
        taps.expected = {name: shape_of(name, config, batch, seq, kv_seq)
                         for name in [*captured, *patched]}
    if gradients:
        if not torch.is_grad_enabled():
            raise ValueError("gradients=True needs gradients recorded: not under torch.no_grad()")
        taps.deltas = {name: torch.zeros(shape_of(name, config, batch, seq, kv_seq),
                                         dtype=model.dtype, device=model.device,
                                         requires_grad=True) for name in captured}
    length = None if cache is None else cache.length.clone()
    try:
        # Nothing to capture or patch: the plain pass (compiled, the plain graph).
        logits = forward(tokens, cache, taps=None if taps.empty else taps, check_values=False)
    except BaseException:
        if length is not None:  # a pass that failed (a patch, say) leaves the cache as it was
            cache.length.copy_(length)
        raise
    activations = {name: taps.captured[name] for name in captured}
    if is_typechecked():
        kept = seq if taps.positions is None else len(taps.positions)
        for name, value in activations.items():
            expected = shape_of(name, config, batch, kept, kv_seq)
            if tuple(value.shape) != expected:
                raise ShapeError(f"captured {name}: expected {' '.join(axes_of(name))} = "
                                 f"{list(expected)}, got {list(value.shape)}")
    if device is not None:
        activations = {name: value.to(device) for name, value in activations.items()}
    return logits, ActivationCache(activations, model, taps.deltas)
