"""GPT-2's layers as pure functions of their inputs and weights, one path each.

Every tensor carries its shape; typechecked mode checks them (see `typecheck.py`). A layer's
weights travel together as one NamedTuple, in torch's (out_features, in_features) layout, as
`F.linear` expects.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from gpt2_decl.core.typecheck import shape_checked


class LayerNormWeights(NamedTuple):
    gain: Float[Tensor, " d_model"]
    bias: Float[Tensor, " d_model"]


class AttentionWeights(NamedTuple):
    """The fused query/key/value projection, laid out [q | k | v], and the output projection."""

    w_qkv: Float[Tensor, "3*d_model d_model"]
    b_qkv: Float[Tensor, " 3*d_model"]
    w_out: Float[Tensor, "d_model d_model"]
    b_out: Float[Tensor, " d_model"]


class MLPWeights(NamedTuple):
    """Up to the hidden layer, four times the residual stream's width in every GPT-2, and down."""

    w_up: Float[Tensor, "4*d_model d_model"]
    b_up: Float[Tensor, " 4*d_model"]
    w_down: Float[Tensor, "d_model 4*d_model"]
    b_down: Float[Tensor, " d_model"]


@shape_checked
def embeddings(
    tokens: Int[Tensor, "batch seq"],
    positions: Int[Tensor, "#batch seq"],
    token_embedding: Float[Tensor, "vocab d_model"],
    position_embedding: Float[Tensor, "n_ctx d_model"],
) -> tuple[Float[Tensor, "batch seq d_model"], Float[Tensor, "#batch seq d_model"]]:
    """The tokens' rows of the token embedding and the positions' rows of the position
    embedding (their sum enters the first block)."""
    return F.embedding(tokens, token_embedding), F.embedding(positions, position_embedding)


@shape_checked
def layer_norm(
    x: Float[Tensor, "batch seq d_model"], weights: LayerNormWeights, eps: float
) -> Float[Tensor, "batch seq d_model"]:
    return F.layer_norm(x, weights.gain.shape, weights.gain, weights.bias, eps)


@shape_checked
def qkv_heads(
    x: Float[Tensor, "batch seq d_model"], weights: AttentionWeights, n_head: int
) -> tuple[
    Float[Tensor, "batch head seq d_head"],
    Float[Tensor, "batch head seq d_head"],
    Float[Tensor, "batch head seq d_head"],
]:
    """Queries, keys and values of every head, from one fused projection."""
    qkv = linear(x, weights.w_qkv, weights.b_qkv)
    q, k, v = rearrange(
        qkv, "batch seq (three head d_head) -> three batch head seq d_head", three=3, head=n_head
    )
    return q, k, v


@shape_checked
def attend(
    q: Float[Tensor, "batch head seq d_head"],
    keys: Float[Tensor, "batch head kv_seq d_head"],
    values: Float[Tensor, "batch head kv_seq d_head"],
    visible: Bool[Tensor, "#batch 1 seq kv_seq"] | None,
    dropout: float = 0.0,
) -> Float[Tensor, "batch head seq d_head"]:
    """Softmax attention, scaled by 1/sqrt(d_head): each query sees the keys `visible` marks, or,
    with no mask, its own position and those before it (causal)."""
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=visible, is_causal=visible is None, dropout_p=dropout
    )


@shape_checked
def attention_scores(
    q: Float[Tensor, "batch head seq d_head"],
    keys: Float[Tensor, "batch head kv_seq d_head"],
    visible: Bool[Tensor, "#batch 1 seq kv_seq"] | None,
) -> Float[Tensor, "batch head seq kv_seq"]:
    """Each query's dot product with every key, scaled by 1/sqrt(d_head); -inf where the key is
    hidden (`visible`, or with no mask, the keys after the query's own position). The scale
    goes on the queries (d_head numbers a row, not kv_seq) and the mask into the new scores."""
    scores = (q / math.sqrt(q.shape[-1])) @ keys.mT
    if visible is None:
        seq, kv_seq = scores.shape[-2:]
        visible = torch.ones(seq, kv_seq, dtype=torch.bool, device=q.device).tril(kv_seq - seq)
    return scores.masked_fill_(~visible, float("-inf"))


@shape_checked
def attention_pattern(
    scores: Float[Tensor, "batch head seq kv_seq"], dropout: float = 0.0
) -> Float[Tensor, "batch head seq kv_seq"]:
    """How much each query attends to each key: the softmax of its scores."""
    return maybe_dropout(scores.softmax(-1), dropout)


@shape_checked
def weighted_values(
    pattern: Float[Tensor, "batch head seq kv_seq"],
    values: Float[Tensor, "batch head kv_seq d_head"],
) -> Float[Tensor, "batch head seq d_head"]:
    """Each head's output: the values weighted by its pattern (what `attend` gives at once)."""
    return pattern @ values


@shape_checked
def merge_heads(
    heads: Float[Tensor, "batch head seq d_head"],
    weights: AttentionWeights,
    dropout: float = 0.0,
) -> Float[Tensor, "batch seq d_model"]:
    """The heads side by side, through the output projection."""
    merged = rearrange(heads, "batch head seq d_head -> batch seq (head d_head)")
    return maybe_dropout(linear(merged, weights.w_out, weights.b_out), dropout)


@shape_checked
def mlp_up(x: Float[Tensor, "batch seq d_model"], weights: MLPWeights
           ) -> Float[Tensor, "batch seq 4*d_model"]:
    """Into the MLP's hidden layer, before GELU."""
    return linear(x, weights.w_up, weights.b_up)


@shape_checked
def mlp_down(
    hidden: Float[Tensor, "batch seq 4*d_model"], weights: MLPWeights, dropout: float = 0.0
) -> Float[Tensor, "batch seq d_model"]:
    """Out of the MLP's hidden layer, after GELU, back to the residual stream's width."""
    return maybe_dropout(linear(hidden, weights.w_down, weights.b_down), dropout)


@shape_checked
def gelu(x: Float[Tensor, "batch seq d_mlp"]) -> Float[Tensor, "batch seq d_mlp"]:
    # The released weights were trained with the tanh approximation; exact GELU does not match.
    return F.gelu(x, approximate="tanh")


@shape_checked
def unembed(
    x: Float[Tensor, "batch seq d_model"],
    token_embedding: Float[Tensor, "vocab d_model"],
) -> Float[Tensor, "batch seq vocab"]:
    """Logits from the residual stream through the (tied) token embedding; GPT-2 has no bias."""
    return linear(x, token_embedding)


@shape_checked
def linear(
    x: Float[Tensor, "batch seq d_in"],
    weight: Float[Tensor, "d_out d_in"],
    bias: Float[Tensor, " d_out"] | None = None,
) -> Float[Tensor, "batch seq d_out"]:
    return F.linear(x, weight, bias)


def maybe_dropout(x: Tensor, p: float) -> Tensor:
    # Skipping the call at p == 0 keeps dropout out of inference graphs entirely.
    return F.dropout(x, p) if p > 0 else x
