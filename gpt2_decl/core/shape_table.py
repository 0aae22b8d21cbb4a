"""A table of every stage's shapes, read from the annotations that `check_shapes` checks."""

from collections.abc import Iterator

import torch
from torch import nn

from gpt2_decl.core.config import GPT2Config
from gpt2_decl.core.counting import ParameterCounts, count_parameters
from gpt2_decl.core.model import GPT2
from gpt2_decl.core.shapes import check_shapes
from gpt2_decl.core.typecheck import CheckedCall

# The rows of each block: (row, the function whose checked value it shows, the value's label,
# the part of the block whose parameters it counts), in the order the block calls them.
BLOCK_ROWS = (
    ("attention in", "layer_norm", "return", "block.ln_1"),
    ("queries, keys, values", "qkv_heads", "return[0]", "block.attn.qkv"),
    ("attention out", "merge_heads", "return", "block.attn.proj"),
    ("MLP in", "layer_norm", "return", "block.ln_2"),
    ("MLP hidden", "gelu", "return", "block.mlp.up"),
    ("MLP out", "mlp", "return", "block.mlp.down"),
    ("residual", "Block.forward", "return", None),
)


def shape_table(model: nn.Module | GPT2Config, batch: int = 1, seq: int | None = None) -> str:
    """A table of the model's shapes for a [batch, seq] input (seq defaults to n_ctx), read
    from the annotations that `check_shapes` checks: one row per stage and layer, its shape
    with named axes, and the parameters of that part."""
    if isinstance(model, GPT2Config):
        with torch.device("meta"):
            model = GPT2(model)
    config = model.config
    seq = config.n_ctx if seq is None else seq
    calls = iter(check_shapes(model, batch, seq).calls)
    counts = count_parameters(config)
    parts = counts.parts
    rows = [("embed", *_shape(_next(calls, "embed"), "return"),
             parts["token_embedding"] + parts["position_embedding"])]
    for index in range(config.n_layer):
        for row, function, label, part in BLOCK_ROWS:
            call = _next(calls, function)
            rows.append((f"block {index} {row}", *_shape(call, label), parts.get(part, 0)))
    rows.append(("final norm", *_shape(_next(calls, "layer_norm"), "return"), parts["ln_f"]))
    rows.append(("logits", *_shape(_next(calls, "unembed"), "return"), 0))
    return _format(config, batch, seq, rows, counts)


def _next(calls: Iterator[CheckedCall], function: str) -> CheckedCall:
    """The next checked call of `function` (calls are recorded as they return)."""
    return next(call for call in calls if call.function.endswith(f".{function}()"))


def _shape(call: CheckedCall, label: str) -> tuple[str, str]:
    """The function's name, and the value's shape written with its axis names."""
    hint, shape = call.hints[label], call.shapes[label]
    names = hint.dim_str.split()
    named = " ".join(f"{axis}={size}" for axis, size in zip(names, shape, strict=True))
    function = call.function.removeprefix("gpt2_decl.core.").removesuffix("()")
    return function.removeprefix("layers.").removeprefix("model."), named


def _format(config: GPT2Config, batch: int, seq: int, rows: list, counts: ParameterCounts) -> str:
    width = max(len(row[2]) for row in rows)
    lines = [
        f"GPT-2 shapes for batch={batch} seq={seq} (n_layer={config.n_layer} n_head="
        f"{config.n_head} d_model={config.d_model} d_head={config.d_head} d_mlp={config.d_mlp} "
        f"vocab={config.vocab_size} n_ctx={config.n_ctx})",
        "",
        f"{'stage':<32}{'function':<15}{'shape':<{width + 2}}{'parameters':>14}",
    ]
    for stage, function, shape, parameters in rows:
        owned = "(tied: embed)" if stage == "logits" else f"{parameters:,}" if parameters else ""
        lines.append(f"{stage:<32}{function:<15}{shape:<{width + 2}}{owned:>14}")
    lines.append("")
    lines.append(f"total: {counts.tied:,} parameters ({counts.untied:,} counted untied, the "
                 "output head as a second copy of the token embedding)")
    return "\n".join(lines)
