"""Pictures of what a forward pass computes, as PNG files (matplotlib, no screen needed): a
layer's attention patterns with the tokens on the axes, and the logit lens."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gpt2_decl.core import layers


@dataclass(frozen=True)
class LogitLens:
    """Each layer's most likely next token at each position, read through the final
    LayerNorm and the unembedding: rows are the residual stream into each block and out of
    the last."""

    top_ids: Tensor  # [n_layer + 1, seq]
    top_probabilities: Tensor  # [n_layer + 1, seq]


def logit_lens(model, cache) -> LogitLens:
    """The logit lens of one prompt (batch 1) from its captured residual stream (every
    block's resid_pre and resid_final)."""
    resid = cache.accumulated_resid()[:, 0]  # [n_layer + 1, seq, d_model]
    with torch.no_grad():
        normed = layers.layer_norm(resid, model.ln_f.weights(), model.config.layer_norm_eps)
        probabilities = layers.unembed(normed, model.lm_head.weight).float().softmax(-1)
    top = probabilities.max(-1)
    return LogitLens(top.indices, top.values)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


# Past these, a picture would grow with the prompt beyond what can be drawn or read: a panel
# of attention stops growing and labels every few tokens; the logit lens shows the last
# positions.
PANEL_INCHES = 10.0
LABELLED_TOKENS = 48
LENS_POSITIONS = 40


def draw_attention(pattern: Tensor, labels: Sequence[str], path: Path, title: str) -> Path:
    """A layer's attention patterns ([head, seq, seq], one prompt), a panel per head: queries
    down, keys across, the tokens on both axes (every few tokens, for long prompts)."""
    heads, seq = pattern.shape[0], pattern.shape[1]
    columns = min(4, heads)
    rows = math.ceil(heads / columns)
    side = min(PANEL_INCHES, max(2.5, 0.22 * seq))
    figure = _figure(columns * side, rows * side + 0.6)
    figure.suptitle(title)
    ticks = range(0, seq, math.ceil(seq / LABELLED_TOKENS))
    for head in range(heads):
        axes = figure.add_subplot(rows, columns, head + 1)
        axes.imshow(pattern[head].float().cpu().numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
        axes.set_title(f"head {head}", fontsize=9)
        shown = [labels[tick] for tick in ticks]
        axes.set_xticks(ticks, shown, rotation=90, fontsize=6, parse_math=False)
        axes.set_yticks(ticks, shown, fontsize=6, parse_math=False)
    return _save(figure, path)


def draw_logit_lens(lens: LogitLens, labels: Sequence[str], decode: Callable[[int], str],
                    path: Path, title: str) -> Path:
    """The logit lens as a grid: a row per layer (the input first), a column per position
    (the last `LENS_POSITIONS` of a longer prompt), each cell the top next token, shaded by
    its probability."""
    rows, seq = lens.top_ids.shape
    shown = min(seq, LENS_POSITIONS)
    top_ids, probabilities = lens.top_ids[:, -shown:], lens.top_probabilities[:, -shown:]
    if shown < seq:
        title = f"{title} (the last {shown} of {seq} positions)"
    figure = _figure(max(4.0, 0.9 * shown + 1.5), 0.45 * rows + 1.5)
    axes = figure.add_subplot()
    axes.imshow(probabilities.cpu().numpy(), cmap="Greens", vmin=0.0, vmax=1.0, aspect="auto")
    for row in range(rows):
        for column in range(shown):
            axes.text(column, row, decode(int(top_ids[row, column])), ha="center",
                      va="center", fontsize=7, parse_math=False)
    axes.set_xticks(range(shown), labels[-shown:], rotation=90, fontsize=7, parse_math=False)
    axes.set_yticks(range(rows), ["embed", *(f"after {i}" for i in range(rows - 1))],
                    fontsize=7)
    axes.set_title(title)
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
