"""GPT-2 as a composition of the layers: embed, transformer blocks, unembed."""

import math
import os

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_decl import layers
from gpt2_decl.config import GPT2Config
from gpt2_decl.kv_cache import KVCache, LayerCache
from gpt2_decl.typecheck import shape_checked


class Block(nn.Module):
    """One pre-LayerNorm transformer block: attention, then the MLP, each added to the residual."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        d_model, d_mlp = config.d_model, config.d_mlp
        self.ln_1 = nn.LayerNorm(d_model, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.ln_2 = nn.LayerNorm(d_model, eps=config.layer_norm_eps)
        self.mlp_in = nn.Linear(d_model, d_mlp)
        self.mlp_out = nn.Linear(d_mlp, d_model)

    @shape_checked
    def forward(
        self, residual: Float[Tensor, "batch seq d_model"], cache: LayerCache | None = None
    ) -> Float[Tensor, "batch seq d_model"]:
        eps, dropout = self.config.layer_norm_eps, self.dropout
        attn_in = layers.layer_norm(residual, self.ln_1.weight, self.ln_1.bias, eps)
        attn_out = layers.causal_self_attention(
            attn_in,
            self.qkv.weight,
            self.qkv.bias,
            self.attn_out.weight,
            self.attn_out.bias,
            self.config.n_head,
            dropout,
            cache,
        )
        residual_mid = residual + attn_out
        mlp_in = layers.layer_norm(residual_mid, self.ln_2.weight, self.ln_2.bias, eps)
        mlp_out = layers.mlp(
            mlp_in,
            self.mlp_in.weight,
            self.mlp_in.bias,
            self.mlp_out.weight,
            self.mlp_out.bias,
            dropout,
        )
        return residual_mid + mlp_out

    @property
    def dropout(self) -> float:
        return self.config.dropout if self.training else 0.0


class GPT2(nn.Module):
    """GPT-2: token + position embeddings, `n_layer` blocks, final LayerNorm, tied output head."""

    def __init__(self, config: GPT2Config | None = None):
        super().__init__()
        self.config = config = config or GPT2Config()
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.n_ctx, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        # The output head is the token embedding itself (tied): one tensor, two names.
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight
        self.reset_parameters()

    @shape_checked
    def forward(
        self,
        tokens: Int[Tensor, "batch seq"],
        cache: KVCache | None = None,
        *,
        last_only: bool = False,
    ) -> Float[Tensor, "batch seq_out vocab"]:
        """Next-token logits for every position of `tokens` (seq_out = seq), or for the last
        one only with `last_only` (seq_out = 1): all that generating the next token needs, and
        the output head, the largest matrix, then multiplies one position instead of all.

        With a `cache`, `tokens` continue the cached ones at `cache.positions`: attention reads
        the earlier keys and values from the cache and adds these tokens' own.
        """
        self.check_tokens(tokens)
        residual = self.embed(tokens, None if cache is None else cache.positions)
        for index, block in enumerate(self.blocks):
            residual = block(residual, None if cache is None else cache.layer(index))
        return self.unembed(residual[:, -1:] if last_only else residual)

    def generate(self, tokens: Tensor, max_new_tokens: int, **options) -> Tensor:
        """`tokens` continued by up to `max_new_tokens` tokens: see `generation.generate`."""
        # Imported here: generation builds on this module.
        from gpt2_decl.generation import generate

        return generate(self, tokens, max_new_tokens, **options)

    @shape_checked
    def embed(
        self, tokens: Int[Tensor, "batch seq"], positions: Int[Tensor, " seq"] | None = None
    ) -> Float[Tensor, "batch seq d_model"]:
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        embedded = layers.embed(
            tokens, positions, self.token_embedding.weight, self.position_embedding.weight
        )
        return layers.maybe_dropout(embedded, self.config.dropout if self.training else 0.0)

    @shape_checked
    def unembed(
        self, residual: Float[Tensor, "batch seq d_model"]
    ) -> Float[Tensor, "batch seq vocab"]:
        normed = layers.layer_norm(
            residual, self.ln_f.weight, self.ln_f.bias, self.config.layer_norm_eps
        )
        return layers.unembed(normed, self.lm_head.weight)

    def check_tokens(self, tokens: object, start: int = 0) -> None:
        """Reject bad input here, with a clear message, rather than deep inside torch.

        Skipped while `torch.compile` traces (the range check reads values, which would break the
        graph); `gpt2_decl.compile` runs it eagerly before calling the compiled model.
        """
        if torch.compiler.is_compiling():
            return
        check_tokens(tokens, self.config, self.token_embedding.weight.device, start)

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2's initialisation, reproducible from `seed` (default: the config's seed).

        Weights ~ N(0, init_std), biases 0, LayerNorm (1, 0); the two projections that write into
        the residual stream are scaled by 1/sqrt(2 n_layer), one per residual add.
        """
        if self.device.type == "meta":
            return
        config = self.config
        generator = torch.Generator(device=self.device).manual_seed(
            config.seed if seed is None else seed
        )
        residual_std = config.init_std / math.sqrt(2 * config.n_layer)
        for name, parameter in self.named_parameters():
            if name.endswith(("attn_out.weight", "mlp_out.weight")):
                parameter.normal_(0.0, residual_std, generator=generator)
            elif parameter.ndim == 2:
                parameter.normal_(0.0, config.init_std, generator=generator)
            elif ".ln_" in name or name.startswith("ln_"):
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                parameter.zero_()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        config: GPT2Config | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> "GPT2":
        """A GPT-2 with released (Hugging Face layout) or saved weights, in eval mode.

        path: a directory holding `config.json` and `model.safetensors` or `pytorch_model.bin`
            (or shards of either with their `.index.json`), or one weights file with `config`.
        config: the architecture; overrides the directory's `config.json`.
        dtype: the parameters' dtype (default: the checkpoint's).
        device: where the weights are loaded, directly (default: cpu).
        Raises `weights.CheckpointError` (a ValueError) naming what is missing, unexpected,
        misshapen, corrupt or unsupported.
        """
        # Imported here: weights builds on this module.
        from gpt2_decl.weights import load_pretrained

        return load_pretrained(path, config=config, dtype=dtype, device=device, model_class=cls)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` + `model.safetensors` (Hugging Face names and layout) atomically."""
        from gpt2_decl.weights import save_pretrained

        save_pretrained(self, directory)


def check_tokens(tokens: object, config: GPT2Config, device: torch.device, start: int = 0) -> None:
    """Raise TypeError/ValueError naming what was expected when `tokens` cannot be fed to GPT-2."""
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
    if start + seq > config.n_ctx:
        raise ValueError(
            f"sequence of {start + seq} tokens is longer than the context of {config.n_ctx} (n_ctx)"
        )
    if tokens.device != device:
        raise ValueError(
            f"tokens are on {tokens.device} but the model is on {device}; move one of them "
            f"(e.g. tokens.to({str(device)!r}))"
        )
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")
