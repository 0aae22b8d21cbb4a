// Products of a few rows with a weight matrix, for CPU decoding, which reads every weight once
// per token. The weight is streamed in blocks of rows, the next block prefetched while this one
// is used (the hardware prefetcher alone leaves much of the memory bandwidth unused on short
// rows), and each block is multiplied by every input row while it is in cache. The inner loops
// run over fixed-size lanes of independent sums, which the compiler turns into vector code.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kRows = 8;    // weight rows read together
constexpr int64_t kLanes = 16;  // independent sums per row (64 bytes of float32 weights)

inline float from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline float bfloat16_value(uint16_t bits) { return from_bits(uint32_t(bits) << 16); }

inline float sum_lanes(const float* lanes) {
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// Calls block(n0, rows) for the blocks of kRows weight rows, split among torch's threads.
template <typename Block>
void for_blocks(int64_t N, const Block& block) {
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) block(b * kRows, std::min(kRows, N - b * kRows));
  });
}

// y[m, n] = sum_k x[m, k] * w[n, k] for the float32 rows n0..n0+rows.
void float32_block(const float* x, int64_t M, const float* w, int64_t K, int64_t N,
                   int64_t n0, int64_t rows, float* y) {
  const int64_t k_lanes = rows == kRows ? K / kLanes * kLanes : 0;
  const bool prefetch = n0 + 2 * kRows <= N;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    float acc[kRows][kLanes] = {};
    for (int64_t k = 0; k < k_lanes; k += kLanes) {
      for (int64_t r = 0; r < kRows; ++r) {
        const float* wr = w + (n0 + r) * K + k;
        if (prefetch && m == 0) __builtin_prefetch(wr + kRows * K);
        for (int64_t l = 0; l < kLanes; ++l) acc[r][l] += wr[l] * xm[k + l];
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      float total = sum_lanes(acc[std::min(r, kRows - 1)]) * (k_lanes > 0);
      for (int64_t k = k_lanes; k < K; ++k) total += w[(n0 + r) * K + k] * xm[k];
      y[m * N + n0 + r] = total;
    }
  }
}

// The same for bfloat16 rows, read as pairs: a pair's low half shifted up is its even element
// and its masked high half its odd one, so x comes split: even elements, then odd ones.
void bfloat16_block(const float* x_split, const float* x, int64_t M, const uint16_t* w,
                    int64_t K, int64_t N, int64_t n0, int64_t rows, float* y) {
  const int64_t pairs = K / 2;
  const int64_t pair_lanes = rows == kRows && K % 2 == 0 ? pairs / kLanes * kLanes : 0;
  const bool prefetch = n0 + 2 * kRows <= N;
  for (int64_t m = 0; m < M; ++m) {
    const float* even = x_split + m * K;
    const float* odd = even + pairs;
    float acc[kRows][kLanes] = {};
    for (int64_t j = 0; j < pair_lanes; j += kLanes) {
      for (int64_t r = 0; r < kRows; ++r) {
        const uint32_t* wr = reinterpret_cast<const uint32_t*>(w + (n0 + r) * K) + j;
        if (prefetch && m == 0) __builtin_prefetch(wr + kRows * pairs);
        for (int64_t l = 0; l < kLanes; ++l) {
          acc[r][l] += from_bits(wr[l] << 16) * even[j + l];
          acc[r][l] += from_bits(wr[l] & 0xFFFF0000u) * odd[j + l];
        }
      }
    }
    const float* xm = x + m * K;
    for (int64_t r = 0; r < rows; ++r) {
      float total = sum_lanes(acc[std::min(r, kRows - 1)]) * (pair_lanes > 0);
      for (int64_t k = 2 * pair_lanes; k < K; ++k)
        total += bfloat16_value(w[(n0 + r) * K + k]) * xm[k];
      y[m * N + n0 + r] = total;
    }
  }
}

// The same for int8 rows dequantizing as (q - zero_point) * scale, one scale per row:
// scale * (x . q - zero_point * sum(x)).
template <typename ZeroPoint>
void int8_block(const float* x, const float* x_sums, int64_t M, const int8_t* q,
                const float* scale, const ZeroPoint* zero_point, int64_t K, int64_t N,
                int64_t n0, int64_t rows, float* y) {
  constexpr int64_t kLine = 4 * kLanes;  // 64 weights: a cache line
  const int64_t k_lanes = rows == kRows ? K / kLine * kLine : 0;
  const bool prefetch = n0 + 2 * kRows <= N;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    float acc[kRows][kLanes] = {};
    for (int64_t k = 0; k < k_lanes; k += kLine) {
      for (int64_t r = 0; r < kRows; ++r) {
        const int8_t* qr = q + (n0 + r) * K + k;
        if (prefetch && m == 0) __builtin_prefetch(qr + kRows * K);
        float wf[kLine];
        for (int64_t i = 0; i < kLine; ++i) wf[i] = float(qr[i]);
        for (int64_t i = 0; i < kLine; i += kLanes)
          for (int64_t l = 0; l < kLanes; ++l) acc[r][l] += wf[i + l] * xm[k + i + l];
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = n0 + r;
      float total = sum_lanes(acc[std::min(r, kRows - 1)]) * (k_lanes > 0);
      for (int64_t k = k_lanes; k < K; ++k) total += float(q[n * K + k]) * xm[k];
      y[m * N + n] = scale[n] * (total - float(zero_point[n]) * x_sums[m]);
    }
  }
}

// The input rows as float32: bfloat16 ones widened here, as a dispatched conversion costs more
// than the work for a row or two.
at::Tensor float_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_floating_point(),
              "row products take rows of floats [rows, in_features], got ", x.sizes(), " ",
              x.scalar_type());
  if (x.scalar_type() != at::kBFloat16 || !x.is_contiguous())
    return x.to(at::kFloat).contiguous();
  at::Tensor rows = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(x.const_data_ptr());
  float* values = rows.mutable_data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) values[i] = bfloat16_value(bits[i]);
  return rows;
}

at::Tensor row_products(const at::Tensor& x, const at::Tensor& weight) {
  const at::Tensor rows = float_rows(x);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == rows.size(1) && weight.is_contiguous() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "row products take a contiguous float32 or bfloat16 weight [out, ", rows.size(1),
              "], got ", weight.sizes(), " ", weight.scalar_type());
  const int64_t M = rows.size(0), K = rows.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, rows.options());
  const float* xp = rows.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  if (weight.scalar_type() == at::kFloat) {
    const float* wp = weight.const_data_ptr<float>();
    for_blocks(N, [&](int64_t n0, int64_t n) { float32_block(xp, M, wp, K, N, n0, n, yp); });
    return y;
  }
  at::Tensor split = at::empty({M, K}, rows.options());
  float* sp = split.mutable_data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < K / 2; ++i) {
      sp[m * K + i] = xp[m * K + 2 * i];
      sp[m * K + K / 2 + i] = xp[m * K + 2 * i + 1];
    }
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight.const_data_ptr());
  for_blocks(N, [&](int64_t n0, int64_t n) { bfloat16_block(sp, xp, M, wp, K, N, n0, n, yp); });
  return y;
}

at::Tensor int8_row_products(const at::Tensor& x, const at::Tensor& qdata,
                             const at::Tensor& scale, const at::Tensor& zero_point) {
  const at::Tensor rows = float_rows(x);
  const int64_t M = rows.size(0), K = rows.size(1), N = qdata.size(0);
  TORCH_CHECK(qdata.dim() == 2 && qdata.size(1) == K && qdata.is_contiguous() &&
                  qdata.scalar_type() == at::kChar,
              "int8 row products take a contiguous int8 weight [out, ", K, "], got ",
              qdata.sizes(), " ", qdata.scalar_type());
  TORCH_CHECK(scale.numel() == N && zero_point.numel() == N,
              "int8 row products take one scale and zero point per row (", N, "), got ",
              scale.numel(), " and ", zero_point.numel());
  // Scales and int8 zero points are read where they are (converting would cost a dispatch).
  const at::Tensor scales = scale.to(at::kFloat).contiguous();
  const bool int8_zeros = zero_point.scalar_type() == at::kChar && zero_point.is_contiguous();
  const at::Tensor zeros = int8_zeros ? zero_point : zero_point.to(at::kFloat).contiguous();
  std::vector<float> sums(M, 0.0f);
  const float* xp = rows.const_data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) sums[m] += xp[m * K + k];
  at::Tensor y = at::empty({M, N}, rows.options());
  const int8_t* qp = qdata.const_data_ptr<int8_t>();
  const float* sp = scales.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  for_blocks(N, [&](int64_t n0, int64_t n) {
    if (int8_zeros)
      int8_block(xp, sums.data(), M, qp, sp, zeros.const_data_ptr<int8_t>(), K, N, n0, n, yp);
    else
      int8_block(xp, sums.data(), M, qp, sp, zeros.const_data_ptr<float>(), K, N, n0, n, yp);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gpt2_decl, m) {
  m.def("row_products(Tensor x, Tensor weight) -> Tensor");
  m.def("int8_row_products(Tensor x, Tensor qdata, Tensor scale, Tensor zero_point) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt2_decl, CPU, m) {
  m.impl("row_products", &row_products);
  m.impl("int8_row_products", &int8_row_products);
}
