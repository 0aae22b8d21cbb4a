"""Each layer against the formula it implements, written out independently."""

import math

import torch

from gpt2_decl.core import layers

GENERATOR = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GENERATOR)


def test_layer_norm_is_the_normalised_input_scaled_and_shifted():
    x, gain, bias = randn(2, 3, 8), randn(8), randn(8)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * gain + bias
    result = layers.layer_norm(x, layers.LayerNormWeights(gain, bias), 1e-5)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


def test_qkv_heads_split_the_fused_projection_as_q_then_k_then_v_each_by_head():
    d_model, n_head = 4, 2
    # An identity projection with a bias marking each output column: column c holds c.
    w_qkv = torch.cat([torch.eye(d_model)] * 3)
    b_qkv = torch.arange(3 * d_model, dtype=torch.float32)
    weights = layers.AttentionWeights(w_qkv, b_qkv, torch.eye(d_model), torch.zeros(d_model))
    q, k, v = layers.qkv_heads(torch.zeros(1, 1, d_model), weights, n_head)
    # GPT-2's layout: [q | k | v], each (head d_head) wide: head h of q is columns 2h, 2h + 1.
    assert q[0, :, 0].tolist() == [[0, 1], [2, 3]]
    assert k[0, :, 0].tolist() == [[4, 5], [6, 7]]
    assert v[0, :, 0].tolist() == [[8, 9], [10, 11]]


def test_attend_without_a_mask_is_causal_softmax_attention_scaled_by_the_head_width():
    q, k, v = randn(1, 2, 5, 4), randn(1, 2, 5, 4), randn(1, 2, 5, 4)
    scores = q @ k.mT / math.sqrt(4)
    scores = scores.masked_fill(~torch.ones(5, 5).tril().bool(), float("-inf"))
    expected = scores.softmax(-1) @ v
    torch.testing.assert_close(layers.attend(q, k, v, None), expected, atol=1e-6, rtol=1e-5)


def test_attend_over_a_mask_sees_only_the_marked_keys():
    q, k, v = randn(1, 1, 2, 4), randn(1, 1, 6, 4), randn(1, 1, 6, 4)
    visible = torch.tensor([[True, True, False, False, False, False],
                            [True, True, True, False, False, False]])[None, None]
    expected = torch.stack([
        (q[0, 0, row] @ k[0, 0, :n].T / 2).softmax(-1) @ v[0, 0, :n] for row, n in ((0, 2), (1, 3))
    ])
    result = layers.attend(q, k, v, visible)
    torch.testing.assert_close(result[0, 0], expected, atol=1e-6, rtol=1e-5)


def test_merge_heads_puts_the_heads_side_by_side_before_the_output_projection():
    heads = torch.arange(2 * 3 * 2, dtype=torch.float32).view(1, 2, 3, 2)  # 2 heads, 3 positions
    weights = layers.AttentionWeights(torch.zeros(12, 4), torch.zeros(12), torch.eye(4),
                                      torch.ones(4))
    merged = layers.merge_heads(heads, weights)
    # Position p: head 0's pair, then head 1's pair, plus the bias of ones.
    assert merged[0, 1].tolist() == [3.0, 4.0, 9.0, 10.0]


def test_mlp_is_the_tanh_gelu_between_two_projections():
    x = randn(2, 3, 4)
    w_up, b_up, w_down, b_down = randn(16, 4), randn(16), randn(4, 16), randn(4)
    hidden = x @ w_up.T + b_up
    gelu = 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden**3)))
    expected = gelu @ w_down.T + b_down
    weights = layers.MLPWeights(w_up, b_up, w_down, b_down)
    result = layers.mlp_down(layers.gelu(layers.mlp_up(x, weights)), weights)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


def test_embeddings_are_the_rows_of_the_tokens_and_the_positions():
    tokens = torch.tensor([[2, 0]])
    token_embedding, position_embedding = randn(3, 4), randn(5, 4)
    embedded, positioned = layers.embeddings(tokens, torch.tensor([[3, 4]]), token_embedding,
                                             position_embedding)
    torch.testing.assert_close(embedded[0], token_embedding[[2, 0]])
    torch.testing.assert_close(positioned[0], position_embedding[[3, 4]])


def test_explicit_attention_is_the_fused_kernels_attention():
    q, keys, values = randn(1, 2, 5, 8), randn(1, 2, 7, 8), randn(1, 2, 7, 8)
    visible = torch.ones(5, 7, dtype=torch.bool).tril(2)[None, None]
    pattern = layers.attention_pattern(layers.attention_scores(q, keys, visible))
    explicit = layers.weighted_values(pattern, values)
    torch.testing.assert_close(explicit, layers.attend(q, keys, values, visible))
    causal = layers.attention_pattern(layers.attention_scores(q, keys[:, :, :5], None))
    torch.testing.assert_close(layers.weighted_values(causal, values[:, :, :5]),
                               layers.attend(q, keys[:, :, :5], values[:, :, :5], None))


def test_the_layers_file_holds_the_maths_only():
    # One path per layer: no branches on the device, on compilation, or inductor settings.
    source = open(layers.__file__).read()
    for forbidden in ("is_compiling", "device.type", "_inductor", "_dynamo"):
        assert forbidden not in source, forbidden
