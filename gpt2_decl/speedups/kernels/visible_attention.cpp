// Attention of one query per head over the keys a mask shows, for CPU decoding: softmax(q . k *
// scale) . v in float32, reading only the visible keys and values, so that a cache is read as
// far as it is filled (a compiled step, whose shapes are fixed, would read all of it). Sixteen
// keys' scores are summed at a time, their lanes added up together, and their exponentials
// taken together; the values' weighted sum is kept in registers.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vectors.h"

namespace {

using namespace gpt2_decl_kernels;

// out = the visible keys' softmax(q . key * scale) weights times their values, for one head
// (keys and values `stride` apart, the mask's entries `shown_stride` apart); zeros where no key
// is visible, as torch's attention gives.
template <typename Element>
void one_head(const float* q, const Element* keys, const Element* values, int64_t stride,
              const bool* mask, int64_t shown_stride, int64_t T, int64_t D, float scale,
              std::vector<int64_t>& shown, std::vector<float>& weights, float* out) {
  shown.clear();
  for (int64_t t = 0; t < T; ++t)
    if (mask[t * shown_stride]) shown.push_back(t);
  const int64_t n = shown.size();
  const int64_t whole = D - D % kLanes;  // the part of a row in whole vectors
  int64_t i = 0;
  if (whole == D)
    for (; i + kLanes <= n; i += kLanes) {
      Lanes sums[kLanes] = {};
      for (int64_t d = 0; d < D; d += kLanes) {
        const Lanes part = lanes_at(q + d);
        for (int64_t j = 0; j < kLanes; ++j)
          sums[j] += part * lanes_at(keys + shown[i + j] * stride + d);
      }
      sum_lanes<kLanes>(sums, weights.data() + i);
    }
  for (; i < n; ++i) {
    const Element* key = keys + shown[i] * stride;
    Lanes sum = {};
    for (int64_t d = 0; d < whole; d += kLanes) sum += lanes_at(q + d) * lanes_at(key + d);
    float score = 0.0f;
    sum_lanes<1>(&sum, &score);
    for (int64_t d = whole; d < D; ++d) score += q[d] * value_at(key + d);
    weights[i] = score;
  }
  float top = -std::numeric_limits<float>::infinity();
  for (i = 0; i < n; ++i) top = std::max(top, weights[i] *= scale);
  Lanes totals = {};
  for (i = 0; i + kLanes <= n; i += kLanes) {
    const Lanes shares = exp_lanes(load<Lanes>(weights.data() + i) - top);
    std::memcpy(weights.data() + i, &shares, sizeof shares);
    totals += shares;
  }
  float total = 0.0f;
  sum_lanes<1>(&totals, &total);
  for (; i < n; ++i) total += weights[i] = std::exp(weights[i] - top);
  const float share = n > 0 ? 1.0f / total : 0.0f;
  constexpr int64_t kWide = 4;  // vectors of out summed in registers at once
  int64_t d0 = 0;
  for (; d0 + kWide * kLanes <= whole; d0 += kWide * kLanes) {
    Lanes sums[kWide] = {};
    for (i = 0; i < n; ++i) {
      const Element* value = values + shown[i] * stride + d0;
      for (int64_t p = 0; p < kWide; ++p) sums[p] += weights[i] * lanes_at(value + p * kLanes);
    }
    for (int64_t p = 0; p < kWide; ++p) {
      const Lanes part = sums[p] * share;
      std::memcpy(out + d0 + p * kLanes, &part, sizeof part);
    }
  }
  for (int64_t d = d0; d < D; ++d) {
    float sum = 0.0f;
    for (i = 0; i < n; ++i) sum += weights[i] * value_at(values + shown[i] * stride + d);
    out[d] = sum * share;
  }
}

// Every head's attention, split among torch's threads: q (any strides) widened to float32,
// the result rounded back to the element type.
template <typename Element>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
            float scale, at::Tensor& out) {
  const int64_t H = q.size(1), D = q.size(3), T = k.size(2);
  const Element* qp = static_cast<const Element*>(q.const_data_ptr());
  const Element* kp = static_cast<const Element*>(k.const_data_ptr());
  const Element* vp = static_cast<const Element*>(v.const_data_ptr());
  const bool* mp = mask.const_data_ptr<bool>();
  Element* op = static_cast<Element*>(out.mutable_data_ptr());
  at::parallel_for(0, q.size(0) * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> shown;
    std::vector<float> weights(T), query(D), result(D);
    shown.reserve(T);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const Element* head_q = qp + b * q.stride(0) + h * q.stride(1);
      for (int64_t d = 0; d < D; ++d) query[d] = value_at(head_q + d * q.stride(3));
      const int64_t head = b * k.stride(0) + h * k.stride(1);
      one_head(query.data(), kp + head, vp + head, k.stride(2),
               mp + b * mask.stride(0) + h * mask.stride(1), mask.stride(3), T, D, scale, shown,
               weights, result.data());
      for (int64_t d = 0; d < D; ++d) store(result[d], op + bh * D + d);
    }
  });
}

at::Tensor visible_attention(const at::Tensor& q, const at::Tensor& keys,
                             const at::Tensor& values, const at::Tensor& visible, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "visible attention takes one float32 or bfloat16 query a head [batch, heads, 1, "
              "d_head], got ", q.sizes(), " ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  TORCH_CHECK(keys.dim() == 4 && keys.size(0) == B && keys.size(1) == H && keys.size(3) == D &&
                  values.sizes() == keys.sizes() && keys.scalar_type() == q.scalar_type() &&
                  values.scalar_type() == q.scalar_type(),
              "visible attention takes keys and values [", B, ", ", H, ", keys, ", D, "] of ",
              q.scalar_type(), ", got ", keys.sizes(), " ", keys.scalar_type(), " and ",
              values.sizes(), " ", values.scalar_type());
  const int64_t T = keys.size(2);
  TORCH_CHECK(visible.scalar_type() == at::kBool && visible.dim() == 4 && visible.size(2) == 1,
              "visible attention takes a boolean mask [batch, 1 or heads, 1, ", T, "], got ",
              visible.sizes(), " ", visible.scalar_type());
  const at::Tensor mask = visible.expand({B, H, 1, T});
  // Keys and values read a row at a time: each row's elements in order, both laid out alike.
  const bool alike = keys.stride(3) == 1 && keys.strides() == values.strides();
  const at::Tensor k = alike ? keys : keys.contiguous();
  const at::Tensor v = alike ? values : values.contiguous();
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  if (q.scalar_type() == at::kFloat)
    attend<float>(q, k, v, mask, float(scale), out);
  else
    attend<uint16_t>(q, k, v, mask, float(scale), out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2_decl, m) {
  m.def("visible_attention(Tensor q, Tensor keys, Tensor values, Tensor visible, float scale)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt2_decl, CPU, m) { m.impl("visible_attention", &visible_attention); }
