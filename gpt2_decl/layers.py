"""GPT-2's layers as pure functions of their inputs and weights.

Every tensor carries its shape; typechecked mode checks them (see `typecheck.py`). Weight
matrices use torch's (out_features, in_features) layout, as `F.linear` expects.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float, Int
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
    q, k, v = split_heads(linear(x, qkv_weight, qkv_bias), n_head)
    if cache is None:
        heads = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
    else:
        keys, values, positions = cache
        keys.index_copy_(2, positions, k)
        values.index_copy_(2, positions, v)
        visible = torch.arange(keys.shape[2], device=positions.device) <= positions[:, None]
        if dropout == 0 and _compiled_one_query_on_cpu(q):
            heads = attend_one_query(q, keys, values, visible)
        else:
            heads = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=visible, dropout_p=dropout
            )
    merged = rearrange(heads, "batch head seq d_head -> batch seq (head d_head)")
    return maybe_dropout(linear(merged, out_weight, out_bias), dropout)


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
    hidden = F.gelu(linear(x, in_weight, in_bias), approximate="tanh")
    return maybe_dropout(linear(hidden, out_weight, out_bias), dropout)


@shape_checked
def unembed(
    x: Float[Tensor, "batch seq d_model"],
    token_embedding: Float[Tensor, "vocab d_model"],
) -> Float[Tensor, "batch seq vocab"]:
    """Logits from the residual stream through the (tied) token embedding; GPT-2 has no bias."""
    return linear(x, token_embedding)


@shape_checked
def attend_one_query(
    q: Float[Tensor, "batch head 1 d_head"],
    keys: Float[Tensor, "batch head max_len d_head"],
    values: Float[Tensor, "batch head max_len d_head"],
    visible: Bool[Tensor, "1 max_len"],
) -> Float[Tensor, "batch head 1 d_head"]:
    """Softmax attention of one query per head over the `visible` cached positions, in float32 or
    wider.

    Compiled, its two small matmuls and the softmax between them replace the CPU's
    scaled_dot_product_attention kernel, which is slow for one bfloat16 query (117 us for 12
    heads over 160 positions on 2 EPYC cores without AMX, against 26 us in float32). A GPT-2
    small decoding step gets 18% faster in bfloat16 and 3% in float32 (paired timing).
    """
    # At least float32: bfloat16 is widened, float64 kept.
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = q.to(dtype) @ keys.to(dtype).mT / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ values.to(dtype)).to(q.dtype)


# Inductor computes a pointwise result inside each loop that reads it unless told to store it. In
# the one-row `linear` below, that loop runs once per output row, so the input (a LayerNorm, a
# GELU) would be recomputed for every row of the weight. Storing every pointwise result leaves
# each row a plain streaming dot product (GPT-2 small decoding on 2 EPYC cores, per token:
# float32 20.6 -> 19.4 ms, bfloat16 16.0 -> 10.3 ms), and rounds the input to its dtype as eager
# mode does. Dynamo's guards check every input's shape before the graph runs, so the generated
# code's own size and stride asserts on every call are dropped (1% of a float32 step).
# Inductor config for graphs that decode one token on a CPU.
ONE_ROW_INDUCTOR_OPTIONS = {"realize_acc_reads_threshold": 0, "size_asserts": False}


@shape_checked
def linear(
    x: Float[Tensor, "*batch d_in"],
    weight: Float[Tensor, "d_out d_in"],
    bias: Float[Tensor, " d_out"] | None = None,
) -> Float[Tensor, "*batch d_out"]:
    """`x @ weight.T + bias` over the last axis.

    Compiled for one row on a CPU (decoding a single token), it is written as a multiply and a
    sum: inductor turns that into one streaming pass over the weight, which reads memory over
    twice as fast as the BLAS matrix-vector product it would otherwise call (float32 on a 2-core
    EPYC: about 30 GB/s against 13). Eager, or for more rows, it is `F.linear`.
    """
    if _compiled_one_row_on_cpu(x):
        # Accumulated in float32, as BLAS does; inductor also vectorises bfloat16 better so.
        product = (x[..., None, :].float() * weight.float()).sum(-1).to(x.dtype)
        return product if bias is None else product + bias
    return F.linear(x, weight, bias)


def _compiled_one_row_on_cpu(x: Tensor) -> bool:
    """Whether `x` is one row (a single decoded token) inside a graph compiled for the CPU."""
    return torch.compiler.is_compiling() and x.device.type == "cpu" and math.prod(x.shape[:-1]) == 1


def _compiled_one_query_on_cpu(q: Tensor) -> bool:
    """Whether `q` holds one query per head (decoding a single token) in a graph compiled for
    the CPU."""
    return torch.compiler.is_compiling() and q.device.type == "cpu" and q.shape[-2] == 1


def maybe_dropout(x: Tensor, p: float) -> Tensor:
    # Skipping the call at p == 0 keeps dropout out of inference graphs entirely.
    return F.dropout(x, p) if p > 0 else x
