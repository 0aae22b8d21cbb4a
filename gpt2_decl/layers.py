"""GPT-2's layers as pure functions of their inputs and weights.

Every tensor carries its shape; typechecked mode checks them (see `typecheck.py`). Weight
matrices use torch's (out_features, in_features) layout, as `F.linear` expects.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor

from gpt2_decl.kv_cache import LayerCache
from gpt2_decl.typecheck import shape_checked


@shape_checked
def embed(
    tokens: Int[Tensor, "batch seq"],
    positions: Int[Tensor, " seq"],
    token_embedding: Float[Tensor, "vocab d_model"],
    position_embedding: Float[Tensor, "n_ctx d_model"],
) -> Float[Tensor, "batch seq d_model"]:
    return F.embedding(tokens, token_embedding) + F.embedding(positions, position_embedding)


@shape_checked
def layer_norm(
    x: Float[Tensor, "*batch d_model"],
    weight: Float[Tensor, " d_model"],
    bias: Float[Tensor, " d_model"],
    eps: float,
) -> Float[Tensor, "*batch d_model"]:
    return F.layer_norm(x, weight.shape, weight, bias, eps)


@shape_checked
def split_heads(
    qkv: Float[Tensor, "batch seq d_qkv"], n_head: int
) -> tuple[
    Float[Tensor, "batch head seq d_head"],
    Float[Tensor, "batch head seq d_head"],
    Float[Tensor, "batch head seq d_head"],
]:
    """Fused projections are laid out [q | k | v], each (head d_head) wide, as in GPT-2."""
    q, k, v = rearrange(
        qkv, "batch seq (three head d_head) -> three batch head seq d_head", three=3, head=n_head
    )
    return q, k, v


@shape_checked
def causal_self_attention(
    x: Float[Tensor, "batch seq d_model"],
    qkv_weight: Float[Tensor, "3*d_model d_model"],
    qkv_bias: Float[Tensor, " 3*d_model"],
    out_weight: Float[Tensor, "d_model d_model"],
    out_bias: Float[Tensor, " d_model"],
    n_head: int,
    dropout: float = 0.0,
    cache: LayerCache | None = None,
) -> Float[Tensor, "batch seq d_model"]:
    """Multi-head attention where each position sees itself and the positions before it.

    With a `cache` (keys, values, positions of `x`'s tokens), the new keys and values are written
    into it in place, and the queries attend over every cached position up to their own.
    """
    q, k, v = split_heads(F.linear(x, qkv_weight, qkv_bias), n_head)
    if cache is None:
        heads = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
    else:
        keys, values, positions = cache
        keys.index_copy_(2, positions, k)
        values.index_copy_(2, positions, v)
        visible = torch.arange(keys.shape[2], device=positions.device) <= positions[:, None]
        heads = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=visible, dropout_p=dropout
        )
    merged = rearrange(heads, "batch head seq d_head -> batch seq (head d_head)")
    return maybe_dropout(F.linear(merged, out_weight, out_bias), dropout)


@shape_checked
def mlp(
    x: Float[Tensor, "batch seq d_model"],
    in_weight: Float[Tensor, "d_mlp d_model"],
    in_bias: Float[Tensor, " d_mlp"],
    out_weight: Float[Tensor, "d_model d_mlp"],
    out_bias: Float[Tensor, " d_model"],
    dropout: float = 0.0,
) -> Float[Tensor, "batch seq d_model"]:
    # The released weights were trained with the tanh approximation; exact GELU does not match.
    hidden = F.gelu(F.linear(x, in_weight, in_bias), approximate="tanh")
    return maybe_dropout(F.linear(hidden, out_weight, out_bias), dropout)


@shape_checked
def unembed(
    x: Float[Tensor, "batch seq d_model"],
    token_embedding: Float[Tensor, "vocab d_model"],
) -> Float[Tensor, "batch seq vocab"]:
    """Logits from the residual stream through the (tied) token embedding; GPT-2 has no bias."""
    return F.linear(x, token_embedding)


def maybe_dropout(x: Tensor, p: float) -> Tensor:
    # Skipping the call at p == 0 keeps dropout out of inference graphs entirely.
    return F.dropout(x, p) if p > 0 else x
