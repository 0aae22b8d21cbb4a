// Causal self-attention of bfloat16 queries, keys and values in matrix tiles (AMX), through
// torch's batch-reduce GEMM (at::native::cpublas::brgemm, oneDNN's micro-kernels).
//
// A task takes 32 query rows of one head and passes over the keys in blocks of 64 up to the
// last row's position. The scores of a block are computed transposed, keys x queries
// (the keys' rows times the queries packed in pairs of their elements, as the tiles read a
// matrix on the right), so that the online softmax runs down the block with each query a lane
// of two vectors: no sums across lanes. Exponentials are taken in base 2, within 3e-6 of them,
// far inside the bfloat16 rounding of the weights they become; the weights, packed in pairs of
// keys, multiply the values transposed (values x keys) into float32 sums, outputs x queries.
// Both products have the same shape when d_head is 64, so the tiles are configured once.
#include "causal_attention_tiles.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "vectors.h"

namespace gpt2_decl_kernels {
namespace {

namespace cpublas = at::native::cpublas;

constexpr int64_t kBlock = 64;             // keys per block
constexpr int64_t kQueries = 2 * kLanes;   // query rows per task: lanes of two vectors
constexpr int64_t kMaxHead = 8 * kLanes;   // d_head up to 128
constexpr float kHidden = -std::numeric_limits<float>::infinity();

const at::BFloat16* tiles(const uint16_t* bits) {
  return reinterpret_cast<const at::BFloat16*>(bits);
}

// 2^x lane by lane for x <= 0 (below -126 taken as -126), within 3e-6 relatively: 2^k 2^f
// with k = x rounded and 2^f, |f| <= 1/2, by a polynomial fitted at Chebyshev nodes.
inline Lanes exp2_lanes(Lanes x) {
  x = x < -126.0f ? Lanes{} - 126.0f : x;
  const Lanes shifted = x + 12582912.0f;  // 1.5 * 2^23: k in the low bits
  const Lanes f = x - (shifted - 12582912.0f);
  Lanes p = 9.560510206e-3f * f + 5.591703917e-2f;
  p = p * f + 2.402498111e-1f;
  p = p * f + 6.931219677e-1f;
  p = p * f + 9.999991909e-1f;
  Words bits, powers;
  std::memcpy(&bits, &p, sizeof bits);
  std::memcpy(&powers, &shifted, sizeof powers);
  return as_lanes(bits + ((powers - 0x4B400000u) << 23));
}

// Two vectors of finite lanes rounded to bfloat16 (to nearest, ties to even) and interleaved,
// a0 b0 a1 b1 ..., as the tiles read two rows of a right-hand matrix.
inline void store_pairs(Lanes a, Lanes b, uint16_t* at) {
  Words low, high;
  std::memcpy(&low, &a, sizeof low);
  std::memcpy(&high, &b, sizeof high);
  low = (low + 0x7FFFu + ((low >> 16) & 1u)) >> 16;
  high = (high + 0x7FFFu + ((high >> 16) & 1u)) >> 16;
  const Words pairs = low | high << 16;
  std::memcpy(at, &pairs, sizeof pairs);
}

// Per head and block of 64 keys: the keys' rows side by side [64, D] and the values
// transposed [D, 64], zero past the last key; keys and values past `keys` are never read.
void lay_out_keys_and_values(const at::Tensor& k, const at::Tensor& v, int64_t keys,
                             int64_t blocks, uint16_t* key_rows, uint16_t* values_t) {
  const int64_t H = k.size(1), D = k.size(3);
  const uint16_t* kp = static_cast<const uint16_t*>(k.const_data_ptr());
  const uint16_t* vp = static_cast<const uint16_t*>(v.const_data_ptr());
  at::parallel_for(0, k.size(0) * H * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, b = bh / H, h = bh % H, t0 = task % blocks * kBlock;
      const int64_t n = std::min(kBlock, keys - t0);
      const uint16_t* kh = kp + b * k.stride(0) + h * k.stride(1) + t0 * k.stride(2);
      const uint16_t* vh = vp + b * v.stride(0) + h * v.stride(1) + t0 * v.stride(2);
      uint16_t* rows = key_rows + task * kBlock * D;
      uint16_t* columns = values_t + task * D * kBlock;
      for (int64_t j = 0; j < kBlock; ++j) {
        if (j < n) std::memcpy(rows + j * D, kh + j * k.stride(2), D * sizeof(uint16_t));
        else std::memset(rows + j * D, 0, D * sizeof(uint16_t));
      }
      // 16 x 16 at a time: 16 value rows in cache while their columns go out.
      for (int64_t d0 = 0; d0 < D; d0 += kLanes)
        for (int64_t j0 = 0; j0 < kBlock; j0 += kLanes) {
          uint16_t square[kLanes][kLanes];
          for (int64_t j = 0; j < kLanes; ++j) {
            if (j0 + j < n) std::memcpy(square[j], vh + (j0 + j) * v.stride(2) + d0, sizeof square[j]);
            else std::memset(square[j], 0, sizeof square[j]);
          }
          for (int64_t d = 0; d < kLanes; ++d)
            for (int64_t j = 0; j < kLanes; ++j) columns[(d0 + d) * kBlock + j0 + j] = square[j][d];
        }
    }
  });
}

// One task: query rows i0 .. i0 + rows - 1 of head bh, at positions p0 = offset + i0 on.
struct Task {
  const uint16_t* q;  // the first row
  int64_t q_row;      // its row stride
  int64_t rows, p0;
};

void attend_rows(const Task& task, const uint16_t* key_rows, const uint16_t* values_t,
                 int64_t D, float base2_scale, uint16_t* out) {
  alignas(64) uint16_t queries[kMaxHead * kQueries];  // pairs: (d / 2, i, d % 2)
  alignas(64) float scores[kBlock * kQueries];        // key j, query i at j * 32 + i
  alignas(64) uint16_t weights[kBlock * kQueries];    // pairs: (j / 2, i, j % 2)
  alignas(64) float sums[kMaxHead * kQueries];        // output d, query i at d * 32 + i
  for (int64_t i = 0; i < kQueries; ++i)
    for (int64_t d = 0; d < D; d += 2) {
      uint32_t pair = 0;
      if (i < task.rows) std::memcpy(&pair, task.q + i * task.q_row + d, sizeof pair);
      std::memcpy(queries + d * kQueries + 2 * i, &pair, sizeof pair);
    }
  std::memset(sums, 0, sizeof(float) * D * kQueries);
  const Picks lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const Picks positions[2] = {lane + int32_t(task.p0), lane + int32_t(task.p0 + kLanes)};
  Lanes tops[2] = {Lanes{} + kHidden, Lanes{} + kHidden}, totals[2] = {};
  const int64_t seen = task.p0 + task.rows;  // keys [0, seen) are seen by some row
  for (int64_t j0 = 0; j0 < seen; j0 += kBlock) {
    // Accumulated into zeros: then both products share one configuration of the tiles.
    std::memset(scores, 0, sizeof scores);
    cpublas::brgemm(kBlock, kQueries, D, D, kQueries, kQueries, true,
                    tiles(key_rows + j0 * D), tiles(queries), scores, true);
    // Keys after a row's own position (in blocks that reach past the first row's) are hidden.
    const bool diagonal = j0 + kBlock - 1 > task.p0;
    // Each half's largest score (the two halves' maxima taken in turn).
    Lanes top[2] = {Lanes{} + kHidden, Lanes{} + kHidden};
    for (int64_t j = 0; j < kBlock; ++j)
      for (int half = 0; half < 2; ++half) {
        Lanes s = load<Lanes>(scores + j * kQueries + half * kLanes);
        if (diagonal) s = positions[half] < int32_t(j0 + j) ? Lanes{} + kHidden : s;
        top[half] = top[half] > s ? top[half] : s;
      }
    Lanes rescale[2];
    for (int half = 0; half < 2; ++half) {
      // Every row sees key 0, in the first block: its top is finite from then on.
      Lanes block_top = top[half] * base2_scale;
      block_top = block_top > tops[half] ? block_top : tops[half];
      rescale[half] = exp2_lanes(tops[half] - block_top);
      tops[half] = block_top;
      totals[half] *= rescale[half];
    }
    for (int64_t d = 0; d < D; ++d)
      for (int half = 0; half < 2; ++half) {
        float* at = sums + d * kQueries + half * kLanes;
        const Lanes scaled = load<Lanes>(at) * rescale[half];
        std::memcpy(at, &scaled, sizeof scaled);
      }
    for (int64_t j = 0; j < kBlock; j += 2)
      for (int half = 0; half < 2; ++half) {
        const float* row = scores + j * kQueries + half * kLanes;
        Lanes first = exp2_lanes(load<Lanes>(row) * base2_scale - tops[half]);
        Lanes second = exp2_lanes(load<Lanes>(row + kQueries) * base2_scale - tops[half]);
        if (diagonal) {  // exactly 0
          first = positions[half] < int32_t(j0 + j) ? Lanes{} : first;
          second = positions[half] < int32_t(j0 + j + 1) ? Lanes{} : second;
        }
        totals[half] += first + second;
        store_pairs(first, second, weights + j * kQueries + 2 * half * kLanes);
      }
    cpublas::brgemm(D, kQueries, kBlock, kBlock, kQueries, kQueries, true,
                    tiles(values_t + j0 * D), tiles(weights), sums, true);
  }
  // sums is outputs x queries: each row of the output is a column, 16 x 16 at a time.
  for (int half = 0; half < 2; ++half) {
    const Lanes inverse = 1.0f / totals[half];
    for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
      alignas(64) float square[kLanes][kLanes];
      for (int64_t d = 0; d < kLanes; ++d) {
        const Lanes row = load<Lanes>(sums + (d0 + d) * kQueries + half * kLanes) * inverse;
        for (int64_t i = 0; i < kLanes; ++i) square[i][d] = row[i];
      }
      for (int64_t i = 0; i < kLanes && half * kLanes + i < task.rows; ++i) {
        const Halves rounded = bfloat16_lanes(load<Lanes>(square[i]));
        std::memcpy(out + (half * kLanes + i) * D + d0, &rounded, sizeof rounded);
      }
    }
  }
}

}  // namespace

bool multiplies_bfloat16_in_tiles() { return cpublas::could_pack(at::kBFloat16); }

void causal_attention_in_tiles(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               int64_t offset, float scale, at::Tensor& out) {
  const int64_t H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t keys = offset + T, blocks = (keys + kBlock - 1) / kBlock;
  at::Tensor key_rows = at::empty({q.size(0) * H, blocks * kBlock * D}, q.options());
  at::Tensor values_t = at::empty({q.size(0) * H, blocks * D * kBlock}, q.options());
  uint16_t* kr = static_cast<uint16_t*>(key_rows.mutable_data_ptr());
  uint16_t* vt = static_cast<uint16_t*>(values_t.mutable_data_ptr());
  lay_out_keys_and_values(k, v, keys, blocks, kr, vt);
  const uint16_t* qp = static_cast<const uint16_t*>(q.const_data_ptr());
  uint16_t* op = static_cast<uint16_t*>(out.mutable_data_ptr());
  const float base2_scale = scale * 1.44269504088896341f;  // scores as powers of 2
  const int64_t tasks = (T + kQueries - 1) / kQueries;
  at::parallel_for(0, q.size(0) * H * tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t bh = index / tasks, b = bh / H, h = bh % H, i0 = index % tasks * kQueries;
      const Task task{qp + b * q.stride(0) + h * q.stride(1) + i0 * q.stride(2), q.stride(2),
                      std::min(kQueries, T - i0), offset + i0};
      attend_rows(task, kr + bh * blocks * kBlock * D, vt + bh * blocks * D * kBlock, D,
                  base2_scale, op + (bh * T + i0) * D);
    }
    cpublas::brgemm_release(true);  // this thread's tiles
  });
}

}  // namespace gpt2_decl_kernels
