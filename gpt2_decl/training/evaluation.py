"""The loss: next-token cross entropy, averaged over held-out windows or a checkpoint's split."""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_decl.core.config import DTYPES, GPT2Config
from gpt2_decl.core.devices import resolve_device
from gpt2_decl.core.model import GPT2
from gpt2_decl.core.typecheck import shape_checked
from gpt2_decl.storage.huggingface import find_checkpoint
from gpt2_decl.training.checkpoints import read_training_options
from gpt2_decl.training.data import Tokenizer, evaluation_batches, load_corpus, split_tokens
from gpt2_decl.training.distributed import ProcessGroup

EVAL_SPLITS = ("val", "train", "all")
DEFAULT_VAL_FRACTION = 0.1


@shape_checked
def next_token_loss(
    logits: Float[Tensor, "batch seq vocab"], targets: Int[Tensor, "batch seq"]
) -> Float[Tensor, ""]:
    """Mean cross entropy of each position's logits against the token that follows it."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def check_fits(tokens: np.ndarray, config: GPT2Config) -> None:
    """Refuse data that the model cannot read: ids beyond its vocabulary, or less than a window.
    (Checked here, once, so that the steps need not read their ids.)"""
    if len(tokens) < config.n_ctx + 1:
        raise ValueError(
            f"the data has {len(tokens)} tokens, fewer than one window of n_ctx + 1 = "
            f"{config.n_ctx + 1}"
        )
    largest = int(np.max(tokens))
    if largest >= config.vocab_size:
        raise ValueError(
            f"the data holds token id {largest}, but the model's vocabulary has "
            f"{config.vocab_size} ids; raise vocab_size (--vocab-size) or use the model's tokenizer"
        )


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    tokens: np.ndarray,
    batch_size: int,
    device: torch.device,
    autocast: torch.autocast,
    max_windows: int | None = None,
    group: ProcessGroup | None = None,
) -> tuple[float, int]:
    """(mean loss, target tokens) over consecutive n_ctx windows of `tokens` from the start, the
    first `max_windows` of them if given, shared out over the processes of `group`. Eager, in
    eval mode (restored after)."""
    rank, world_size = (group.rank, group.world_size) if group else (0, 1)
    was_training = model.training
    model.eval()
    losses, counts = [], []
    for inputs, targets in evaluation_batches(
        tokens, model.config.n_ctx, batch_size, device, max_windows, rank, world_size
    ):
        with autocast:
            logits = model(inputs, check_values=False)
        losses.append(next_token_loss(logits, targets).detach())
        counts.append(targets.numel())
    model.train(was_training)
    # Read back once, at the end; summed in float64 on the host (not every device has it).
    batch_losses = torch.stack(losses).float().cpu().double() if losses else torch.zeros(0)
    totals = [float((batch_losses * torch.tensor(counts, dtype=torch.float64)).sum()),
              sum(counts)]
    total, tokens_counted = group.sum(totals) if group else totals
    return total / tokens_counted, int(tokens_counted)


@dataclass(frozen=True)
class Evaluation:
    loss: float
    tokens: int
    split: str
    checkpoint: Path

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    *,
    split: str = "val",
    val_fraction: float | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    tokenizer: Tokenizer | None = None,
) -> Evaluation:
    """Mean next-token loss of a checkpoint over consecutive n_ctx windows of `data`'s split.

    `checkpoint` is a weights directory or a training run directory (its latest checkpoint).
    "val" is the held-out split that training used (its val_fraction, read from the checkpoint
    when training wrote it, else 0.1); "all" is the whole corpus.
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max batches must be a positive integer or None, got {max_batches!r}")
    directory = find_checkpoint(checkpoint)
    device = resolve_device(device)
    model = GPT2.from_pretrained(directory, dtype=torch.float32, device=device)
    n_ctx = model.config.n_ctx
    if val_fraction is None:
        options = read_training_options(directory) if directory.is_dir() else None
        val_fraction = (options or {}).get("val_fraction", DEFAULT_VAL_FRACTION)
    tokens = load_corpus(data, tokenizer, cache_dir).tokens
    if split != "all":
        tokens = split_tokens(tokens, val_fraction, n_ctx)[0 if split == "train" else 1]
    check_fits(tokens, model.config)
    max_windows = None if max_batches is None else max_batches * batch_size
    autocast = torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "float32")
    loss, count = mean_loss(model, tokens, batch_size, device, autocast, max_windows)
    return Evaluation(loss=loss, tokens=count, split=split, checkpoint=directory)
