"""The key/value cache: every layer's keys and values for the tokens seen so far."""

import torch
from jaxtyping import Float, Int
from torch import Tensor

from gpt2_decl.config import GPT2Config

LayerCache = tuple[
    Float[Tensor, "batch head max_len d_head"],
    Float[Tensor, "batch head max_len d_head"],
    Int[Tensor, " seq"],
]

MAX_LEN_AXIS = 2


class KVCache:
    """Keys and values of `max_len` positions per layer, allocated once per generation.

    The shapes never change: each call writes its tokens' keys and values in place at
    `positions`, a tensor rather than a Python int, so a compiled one-token step sees the same
    shapes and guards for every token and is compiled once.
    """

    def __init__(
        self,
        config: GPT2Config,
        batch: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ):
        if not 0 < max_len <= config.n_ctx:
            raise ValueError(f"cache length must be in [1, {config.n_ctx}] (n_ctx), got {max_len}")
        shape = (batch, config.n_head, max_len, config.d_head)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.values = [torch.zeros_like(keys) for keys in self.keys]
        for tensor in self.keys + self.values:
            # One compiled step then serves generations of every length.
            torch._dynamo.mark_dynamic(tensor, MAX_LEN_AXIS)
        self.positions: Int[Tensor, " seq"] = torch.zeros(0, dtype=torch.long, device=device)

    def layer(self, index: int) -> LayerCache:
        """What attention layer `index` reads and writes: its keys, its values, the positions."""
        return self.keys[index], self.values[index], self.positions
