// Causal self-attention of whole sequences (a prompt, a forward pass) on the CPU, summed in
// float32 (bfloat16 elements widened as they are read): softmax(q . k * scale) . v with each
// query seeing its own key and those before it. The queries may follow `offset` earlier keys (a
// prompt after a cache's first tokens): query i is at position offset + i. A few query
// rows at a time pass over the keys in blocks of 64, keeping their running largest score, sum
// and output in registers (the online softmax), and stop at their own position, so the masked
// half of the scores is never computed. The scores of a block are register tiles of query rows
// times key vectors (the keys transposed once, so that 16 keys are a vector); the values are
// summed as the query rows' weights times each value row. Where the CPU multiplies bfloat16 in
// matrix tiles (AMX), bfloat16 attention goes through them instead (causal_attention_tiles.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "causal_attention_tiles.h"
#include "vectors.h"

namespace {

using namespace gpt2_decl_kernels;

constexpr int64_t kKeys = 64;  // keys per block
constexpr int64_t kKeyVectors = kKeys / kLanes;
constexpr float kHidden = -std::numeric_limits<float>::infinity();

// Where one head's rows are: element (t, d) at base + t * row + d.
template <typename Element>
struct Rows {
  const Element* base;
  int64_t row;
  const Element* at(int64_t t) const { return base + t * row; }
};

// Query rows i0 .. i0 + rows - 1 (at most Queries) of one head, at positions from p0 = offset +
// i0, D = Parts * kLanes; keys_t is the head's keys transposed (element (d, t) at d * padded +
// t, zero past the last key).
template <int64_t Queries, int64_t Parts, typename Element>
void query_rows(Rows<Element> q, const float* keys_t, int64_t padded, Rows<Element> v,
                int64_t i0, int64_t offset, int64_t rows, float scale, Element* out) {
  constexpr int64_t D = Parts * kLanes;
  float query[Queries][D];
  for (int64_t r = 0; r < Queries; ++r)
    for (int64_t d = 0; d < D; ++d) query[r][d] = r < rows ? value_at(q.at(i0 + r) + d) * scale : 0.0f;
  Lanes tops = Lanes{} + kHidden;  // each row's largest score so far, a lane a row
  Lanes totals[Queries] = {};      // each row's sum of e^(score - top), spread over lanes
  Lanes sums[Queries][Parts] = {};
  alignas(64) float weights[Queries][kKeys];
  const Picks lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const int64_t p0 = offset + i0;
  const int64_t end = p0 + rows;  // keys [0, end) are seen by some row
  for (int64_t j0 = 0; j0 < end; j0 += kKeys) {
    Lanes scores[Queries][kKeyVectors] = {};
    for (int64_t d = 0; d < D; ++d) {
      Lanes keys[kKeyVectors];
      for (int64_t c = 0; c < kKeyVectors; ++c)
        keys[c] = load<Lanes>(keys_t + d * padded + j0 + c * kLanes);
      for (int64_t r = 0; r < Queries; ++r)
        for (int64_t c = 0; c < kKeyVectors; ++c) scores[r][c] += query[r][d] * keys[c];
    }
    // Keys after a row's own position (only in the last block a row sees) are hidden.
    const bool diagonal = j0 + kKeys > p0;
    alignas(64) float block_top[kLanes];
    std::fill(block_top, block_top + kLanes, kHidden);
    for (int64_t r = 0; r < Queries; ++r) {
      if (diagonal)
        for (int64_t c = 0; c < kKeyVectors; ++c)
          scores[r][c] = lane + int32_t(j0 + c * kLanes - p0 - r) > 0 ? Lanes{} + kHidden
                                                                       : scores[r][c];
      Lanes top = scores[r][0];
      for (int64_t c = 1; c < kKeyVectors; ++c) top = top > scores[r][c] ? top : scores[r][c];
      block_top[r] = max_lanes(top);
    }
    // Every row's key 0 is in the first block: its top is finite from then on.
    const Lanes block_tops = load<Lanes>(block_top);
    const Lanes new_tops = tops > block_tops ? tops : block_tops;
    const Lanes rescale = exp_lanes(tops - new_tops);
    tops = new_tops;
    for (int64_t r = 0; r < Queries; ++r) {
      Lanes block_total = {};
      for (int64_t c = 0; c < kKeyVectors; ++c) {
        Lanes shares = exp_lanes(scores[r][c] - new_tops[r]);
        if (diagonal)  // exactly 0, not e^-87
          shares = lane + int32_t(j0 + c * kLanes - p0 - r) > 0 ? Lanes{} : shares;
        block_total += shares;
        std::memcpy(&weights[r][c * kLanes], &shares, sizeof shares);
      }
      totals[r] = totals[r] * rescale[r] + block_total;
      for (int64_t p = 0; p < Parts; ++p) sums[r][p] *= rescale[r];
    }
    const int64_t keys = std::min(kKeys, end - j0);
    for (int64_t j = 0; j < keys; ++j) {
      Lanes value[Parts];
      for (int64_t p = 0; p < Parts; ++p) value[p] = lanes_at(v.at(j0 + j) + p * kLanes);
      for (int64_t r = 0; r < Queries; ++r)
        for (int64_t p = 0; p < Parts; ++p) sums[r][p] += weights[r][j] * value[p];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float total = 0.0f;
    sum_lanes<1>(&totals[r], &total);
    alignas(64) float result[D];
    for (int64_t p = 0; p < Parts; ++p) {
      const Lanes part = sums[r][p] / total;
      std::memcpy(result + p * kLanes, &part, sizeof part);
    }
    for (int64_t d = 0; d < D; ++d) store(result[d], out + (i0 + r) * D + d);
  }
}

// keys_t[b, h, d, t] = k[b, h, t, d] in float32 for the first T keys, zero from T up to
// `padded`, 16 keys at a time (their rows stay in cache while each d's 16 go out as one line).
template <typename Element>
void transpose_keys(const at::Tensor& k, int64_t T, at::Tensor& keys_t) {
  const int64_t H = k.size(1), D = k.size(3), padded = keys_t.size(3);
  const Element* kp = static_cast<const Element*>(k.const_data_ptr());
  float* tp = keys_t.mutable_data_ptr<float>();
  at::parallel_for(0, k.size(0) * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const Element* head = kp + bh / H * k.stride(0) + bh % H * k.stride(1);
      float* head_t = tp + bh * D * padded;
      for (int64_t t0 = 0; t0 < padded; t0 += kLanes)
        for (int64_t d = 0; d < D; ++d)
          for (int64_t t = t0; t < t0 + kLanes; ++t)
            head_t[d * padded + t] = t < T ? value_at(head + t * k.stride(2) + d) : 0.0f;
    }
  });
}

// Every head's rows, split among torch's threads a few query rows at a time: q [batch, heads,
// seq, D] and v [batch, heads, offset + seq or more, D] with rows of D in order, keys_t [batch,
// heads, D, padded].
template <int64_t Parts, typename Element>
void attend(const at::Tensor& q, const at::Tensor& keys_t, const at::Tensor& v, int64_t offset,
            float scale, at::Tensor& out) {
  constexpr int64_t kQueries = Parts <= 4 ? 6 : 3;  // their sums stay in 24 vector registers
  const int64_t H = q.size(1), T = q.size(2), padded = keys_t.size(3);
  const int64_t blocks = (T + kQueries - 1) / kQueries;
  const Element* qp = static_cast<const Element*>(q.const_data_ptr());
  const float* kp = keys_t.const_data_ptr<float>();
  const Element* vp = static_cast<const Element*>(v.const_data_ptr());
  Element* op = static_cast<Element*>(out.mutable_data_ptr());
  at::parallel_for(0, q.size(0) * H * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, b = bh / H, h = bh % H;
      const int64_t i0 = task % blocks * kQueries;
      query_rows<kQueries, Parts>(
          Rows<Element>{qp + b * q.stride(0) + h * q.stride(1), q.stride(2)},
          kp + bh * Parts * kLanes * padded, padded,
          Rows<Element>{vp + b * v.stride(0) + h * v.stride(1), v.stride(2)}, i0, offset,
          std::min(kQueries, T - i0), scale, op + bh * T * Parts * kLanes);
    }
  });
}

template <typename Element>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t offset,
            float scale, at::Tensor& out) {
  const int64_t keys = offset + q.size(2), padded = (keys + kKeys - 1) / kKeys * kKeys;
  at::Tensor keys_t = at::empty({q.size(0), q.size(1), q.size(3), padded},
                                q.options().dtype(at::kFloat));
  transpose_keys<Element>(k, keys, keys_t);
  switch (q.size(3) / kLanes) {
    case 1: attend<1, Element>(q, keys_t, v, offset, scale, out); break;
    case 2: attend<2, Element>(q, keys_t, v, offset, scale, out); break;
    case 3: attend<3, Element>(q, keys_t, v, offset, scale, out); break;
    case 4: attend<4, Element>(q, keys_t, v, offset, scale, out); break;
    case 5: attend<5, Element>(q, keys_t, v, offset, scale, out); break;
    case 6: attend<6, Element>(q, keys_t, v, offset, scale, out); break;
    case 7: attend<7, Element>(q, keys_t, v, offset, scale, out); break;
    default: attend<8, Element>(q, keys_t, v, offset, scale, out); break;
  }
}

// In rows of d_head in order: as given where they are, else copied so.
at::Tensor in_rows(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            double scale, int64_t offset, bool tiles) {
  TORCH_CHECK(q.dim() == 4 && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "causal attention takes float32 or bfloat16 queries [batch, heads, seq, d_head], "
              "got ", q.sizes(), " ", q.scalar_type());
  TORCH_CHECK(offset >= 0, "causal attention takes an offset of 0 or more, got ", offset);
  const auto like_q = [&](const at::Tensor& x) {
    return x.dim() == 4 && x.scalar_type() == q.scalar_type() && x.size(0) == q.size(0) &&
           x.size(1) == q.size(1) && x.size(3) == q.size(3) && x.size(2) >= offset + q.size(2);
  };
  TORCH_CHECK(like_q(k) && like_q(v),
              "causal attention takes keys and values [batch, heads, offset + seq or more, "
              "d_head] like its queries (", q.sizes(), " ", q.scalar_type(), ", offset ", offset,
              "), got ", k.sizes(), " ", k.scalar_type(), " and ", v.sizes(), " ",
              v.scalar_type());
  const int64_t D = q.size(3);
  TORCH_CHECK(D % kLanes == 0 && D > 0 && D <= 8 * kLanes,
              "causal attention takes d_head a multiple of 16 up to 128, got ", D);
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.scalar_type() == at::kFloat)
    attend<float>(in_rows(q), k, in_rows(v), offset, float(scale), out);
  else if (tiles && multiplies_bfloat16_in_tiles())
    causal_attention_in_tiles(in_rows(q), in_rows(k), in_rows(v), offset, float(scale), out);
  else
    attend<uint16_t>(in_rows(q), k, in_rows(v), offset, float(scale), out);
  return out;
}

bool bfloat16_tiles() { return multiplies_bfloat16_in_tiles(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2_decl, m) {
  // Any strides: the kernel reads rows where they are (the views of one fused projection).
  // tiles: bfloat16 through the matrix tiles where the CPU has them (bfloat16_tiles()).
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale, int offset=0, "
        "bool tiles=True) -> Tensor", {at::Tag::flexible_layout});
  m.def("bfloat16_tiles() -> bool", &bfloat16_tiles);
}

TORCH_LIBRARY_IMPL(gpt2_decl, CPU, m) { m.impl("causal_attention", &causal_attention); }
