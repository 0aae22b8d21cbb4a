"""Checks of what goes into the model, made before any work with a message that names the
problem, rather than an error from deep inside torch."""

import torch
from torch import Tensor

from gpt2_decl.core.config import GPT2Config
from gpt2_decl.core.kv_cache import KVCache


def check_tokens(
    tokens: object,
    config: GPT2Config,
    device: torch.device,
    *,
    cache: KVCache | None = None,
    values: bool = True,
) -> None:
    """Raise TypeError/ValueError naming what was expected when `tokens` cannot be fed to GPT-2.

    values: also check the ids' range and the cache's room, which reads the tensors (skipped
    on the meta device, where there is nothing to read).
    """
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must have an integer dtype (e.g. torch.long), got {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(
            f"tokens must have shape [batch, seq] (2 dimensions), got {tokens.ndim} dimensions "
            f"with shape {tuple(tokens.shape)}"
        )
    batch, seq = tokens.shape
    if batch == 0 or seq == 0:
        raise ValueError(f"tokens must not be empty, got shape {tuple(tokens.shape)}")
    if seq > config.n_ctx:
        raise ValueError(
            f"sequence of {seq} tokens is longer than the context of {config.n_ctx} (n_ctx)"
        )
    if tokens.device != device:
        raise ValueError(
            f"tokens are on {tokens.device} but the model is on {device}; move one of them "
            f"(e.g. tokens.to({str(device)!r}))"
        )
    if cache is not None:
        if cache.batch != batch:
            raise ValueError(f"the cache holds {cache.batch} rows but tokens have {batch}")
        if cache.device != device:
            raise ValueError(f"the cache is on {cache.device} but the model is on {device}")
    if not values or tokens.device.type == "meta":
        return
    # Not every integer dtype has min/max kernels (uint16 has none): widen first.
    low, high = (int(value) for value in tokens.long().aminmax())
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")
    if cache is not None and cache.room() < seq:
        raise ValueError(
            f"the cache has room for {cache.room()} more of its {cache.max_len} positions, "
            f"not {seq}"
        )


def left_padding_start(mask: Tensor, tokens: Tensor) -> Tensor | None:
    """Each row's first real token's column, from an attention mask that pads on the left (None
    when no row is padded). Read on the host, once per call."""
    if not isinstance(mask, Tensor) or mask.shape != tokens.shape:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must have the tokens' shape {tuple(tokens.shape)}, "
                         f"got {shape}")
    real = mask.to(device="cpu", dtype=torch.bool)
    start = (~real).long().sum(-1)
    columns = torch.arange(real.shape[1])
    if not torch.equal(real, columns[None, :] >= start[:, None]):
        raise ValueError("attention_mask must pad on the left: each row is zeros, then ones")
    if bool((start == real.shape[1]).any()):
        raise ValueError("attention_mask has a row of zeros: every prompt needs a token")
    return start.to(tokens.device) if bool(start.any()) else None
