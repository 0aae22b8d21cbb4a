"""The key/value cache: every layer's keys and values for the tokens seen so far."""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from gpt2_decl.core.config import GPT2Config

MAX_LEN_AXIS = 2


class KVCache:
    """Keys and values of up to `max_len` positions per layer, allocated once per generation.

    A forward pass with the cache first `reserve`s the slots of its tokens (which moves the
    cache's length on), then each layer `update`s them with its keys and values and reads back
    all the cache holds, through the mask `visible` gives. Rows may start at different slots
    (`start`: prompts of different lengths, padded on the left): each row's positions count from
    its own start, and it never attends to the padding before it. The length is a tensor and the
    buffers keep their addresses and shapes, so a compiled one-token step sees the same shapes
    and guards for every token and is compiled (and on CUDA, graph-captured) once.
    """

    def __init__(
        self,
        config: GPT2Config,
        batch: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        start: Int[Tensor, " batch"] | None = None,
    ):
        if not 0 < max_len <= config.n_ctx:
            raise ValueError(f"cache length must be in [1, {config.n_ctx}] (n_ctx), got {max_len}")
        if batch < 1:
            raise ValueError(f"cache batch must be >= 1, got {batch}")
        shape = (batch, config.n_head, max_len, config.d_head)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.values = [torch.zeros_like(keys) for keys in self.keys]
        self.length: Int[Tensor, ""] = torch.zeros((), dtype=torch.long, device=device)
        self.start: Int[Tensor, " batch"] = (
            torch.zeros(batch, dtype=torch.long, device=device) if start is None
            else start.to(device=device, dtype=torch.long)
        )
        for tensor in self.keys + self.values:
            # One compiled step then serves generations of every length.
            torch._dynamo.mark_dynamic(tensor, MAX_LEN_AXIS)
        if self.length.device.type == "cuda":
            for tensor in [*self.keys, *self.values, self.length, self.start]:
                # Read or written in place by the step: CUDA graphs replay it at these addresses.
                torch._dynamo.mark_static_address(tensor)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[MAX_LEN_AXIS]

    @property
    def device(self) -> torch.device:
        return self.length.device

    def reserve(self, seq: int) -> Int[Tensor, " seq"]:
        """The slots of the next `seq` tokens; the cache's length moves past them."""
        slots = self.length + torch.arange(seq, device=self.length.device)
        self.length += seq
        return slots

    def positions(self, slots: Int[Tensor, " seq"]) -> Int[Tensor, "batch seq"]:
        """Each row's positions for `slots`, counted from its start (padding before it: 0)."""
        return (slots[None, :] - self.start[:, None]).clamp(min=0)

    def visible(self, slots: Int[Tensor, " seq"]) -> Bool[Tensor, "batch 1 seq max_len"]:
        """Which slots each row's tokens at `slots` attend to: the row's own tokens up to
        itself; a padding token, only itself (it is never read, but must stay finite)."""
        cached = torch.arange(self.max_len, device=slots.device)
        earlier = cached <= slots[:, None]
        own = (cached >= self.start[:, None])[:, None, :] | (cached == slots[:, None])
        return (earlier & own)[:, None]

    def update(
        self,
        layer: int,
        slots: Int[Tensor, " seq"],
        k: Float[Tensor, "batch head seq d_head"],
        v: Float[Tensor, "batch head seq d_head"],
    ) -> tuple[
        Float[Tensor, "batch head max_len d_head"], Float[Tensor, "batch head max_len d_head"]
    ]:
        """Write layer `layer`'s keys and values at `slots`; return all it holds."""
        self.keys[layer].index_copy_(MAX_LEN_AXIS, slots, k)
        self.values[layer].index_copy_(MAX_LEN_AXIS, slots, v)
        return self.keys[layer], self.values[layer]

    def room(self) -> int:
        """Slots still free (reads the length: a synchronisation on an accelerator)."""
        return self.max_len - int(self.length)
