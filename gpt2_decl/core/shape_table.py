"""A table of every named activation's shape, with its named axes, from a typechecked pass on
the meta device (`check_shapes`), and the parameters of the part that computes it."""

import torch
from torch import nn

from gpt2_decl.core.activations import axes_of, layer_of, site_of
from gpt2_decl.core.config import GPT2Config
from gpt2_decl.core.counting import ParameterCounts, count_parameters
from gpt2_decl.core.model import GPT2
from gpt2_decl.core.shapes import check_shapes

# The part whose parameters compute each site (`count_parameters` names them).
PARTS = {"embed": "token_embedding", "pos_embed": "position_embedding",
         "attn_in": "block.ln_1", "q": "block.attn.qkv", "attn_out": "block.attn.proj",
         "mlp_in": "block.ln_2", "mlp_pre": "block.mlp.up", "mlp_out": "block.mlp.down",
         "ln_final": "ln_f"}


def shape_table(model: nn.Module | GPT2Config, batch: int = 1, seq: int | None = None) -> str:
    """Every named activation of a [batch, seq] forward pass (seq defaults to n_ctx), in the
    order it is computed: its full name, its shape with named axes, and the parameters of the
    part that computes it (k and v share q's fused projection)."""
    if isinstance(model, GPT2Config):
        with torch.device("meta"):
            model = GPT2(model)
    config = model.config
    seq = config.n_ctx if seq is None else seq
    shapes = check_shapes(model, batch, seq, activations=True).activations
    counts = count_parameters(config)
    rows = []
    for name, shape in shapes.items():
        named = " ".join(f"{axis}={size}" for axis, size in zip(axes_of(name), shape,
                                                                strict=True))
        part = PARTS.get(site_of(name))
        owned = "(tied: embed)" if name == "logits" else \
            f"{counts.parts[part]:,}" if part else ""
        rows.append((name, named, owned, layer_of(name)))
    return _format(config, batch, seq, rows, counts)


def _format(config: GPT2Config, batch: int, seq: int, rows: list, counts: ParameterCounts) -> str:
    width = max(len(row[1]) for row in rows)
    lines = [
        f"GPT-2 shapes for batch={batch} seq={seq} (n_layer={config.n_layer} n_head="
        f"{config.n_head} d_model={config.d_model} d_head={config.d_head} d_mlp={config.d_mlp} "
        f"vocab={config.vocab_size} n_ctx={config.n_ctx})",
        "",
        f"{'activation':<24}{'shape':<{width + 2}}{'parameters':>14}",
    ]
    for name, shape, owned, _ in rows:
        lines.append(f"{name:<24}{shape:<{width + 2}}{owned:>14}")
    lines.append("")
    lines.append(f"total: {counts.tied:,} parameters ({counts.untied:,} counted untied, the "
                 "output head as a second copy of the token embedding)")
    return "\n".join(lines)
