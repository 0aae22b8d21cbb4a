// Causal attention of bfloat16 in matrix tiles (causal_attention_tiles.cpp), for
// causal_attention.cpp where the CPU has them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace gpt2_decl_kernels {

// Whether this CPU multiplies bfloat16 matrices in tiles (AMX), as torch's brgemm does there.
bool multiplies_bfloat16_in_tiles();

// out [batch, heads, seq, d_head] (contiguous) = causal attention of q [batch, heads, seq,
// d_head] after `offset` earlier keys over k and v [batch, heads, offset + seq or more, d_head],
// all bfloat16 with rows of d_head in order; d_head even, at most 128.
void causal_attention_in_tiles(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               int64_t offset, float scale, at::Tensor& out);

}  // namespace gpt2_decl_kernels
