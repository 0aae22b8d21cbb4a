// Products of a few rows with a weight matrix, for CPU decoding, which reads every weight once
// per token. The weight is streamed in blocks of rows, the next block prefetched into L2 while
// this one is used (the hardware prefetcher alone leaves much of the memory bandwidth unused on
// short rows; prefetching into L1 instead, which the rows at work fill, measured slower), and
// each block is multiplied by every input row while it is in cache: a batch's rows four at a
// time, so that each weight vector loaded feeds four sums. Weights are widened to float32 in
// registers and summed in float32, in vectors of the compiler's vector extension (the machine's
// own vector registers: -march=native), and the lanes of many sums are added up together, by
// folding vectors in halves. More than four input rows (a prompt's tokens) make a GEMM, which
// is bound by arithmetic rather than memory: the input rows are transposed once into panels,
// a block's bfloat16 or int8 rows upcast once into a buffer of the thread's own, and each tile
// of weight rows multiplies a panel as outer products whose sums stay in registers.
//
// int8 weights meet the input rows as integers where the CPU has VNNI (AVX512-VNNI): each input
// row is split into int8 digits and each 64 weights take one integer dot-product instruction a
// digit, where widening them to float32 takes twelve instructions; the integer sums are exact.
// A block of weight rows stays in cache while every input row passes over it. With AVX2 and no
// VNNI, a few input rows are rounded to int16 instead, and meet int8 rows 16 weights at a time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <immintrin.h>

namespace {

// Vectors of float32 lanes, in the compiler's vector extension, each one of the machine's own
// vector registers under -march=native (a vector wider than a register is kept in pieces that the
// compiler moves through memory), and how to add up the lanes of many.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;      // a zmm register: 64 bytes, a cache line
constexpr int64_t kRegisters = 32;  // vector registers, for sums, inputs and widened weights
#else
constexpr int64_t kLanes = 8;       // a ymm register (AVX2): half a cache line
constexpr int64_t kRegisters = 16;
#endif

typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint32_t Words __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// Two vectors of sums spread over Width lanes each (kLanes / Width sums a vector) folded into one
// of sums over Width / 2 lanes: the first vector's sums, then the second's, the upper half of
// each sum's lanes added to the lower. Lane `lane` of the result reads the lower half from
// fold_source (of the two vectors side by side) and the upper half Width / 2 lanes on.
template <int64_t Width>
constexpr int fold_source(int64_t lane) {
  constexpr int64_t kSums = kLanes / Width;
  const int64_t j = lane / (Width / 2), i = lane % (Width / 2);
  return int((j < kSums ? j * Width : kLanes + (j - kSums) * Width) + i);
}

template <int64_t Width, size_t... Lane>
inline Lanes fold(Lanes first, Lanes second, std::index_sequence<Lane...>) {
  return __builtin_shufflevector(first, second, fold_source<Width>(Lane)...) +
         __builtin_shufflevector(first, second, (fold_source<Width>(Lane) + Width / 2)...);
}

template <int64_t Width>
inline Lanes fold(Lanes first, Lanes second) {
  return fold<Width>(first, second, std::make_index_sequence<kLanes>{});
}

// sums[i] = the sum of the lanes of vectors[i], for Count vectors (a power of two, at most
// kLanes), folded pairwise: about two shuffles and an add a vector, not a lane at a time.
template <int64_t Count, int64_t Width = kLanes>
inline void sum_lanes(Lanes* vectors, float* sums) {
  if constexpr (Width == 1) {
    for (int64_t i = 0; i < Count; ++i) sums[i] = vectors[0][i];
  } else if constexpr (Count * Width <= kLanes) {
    // One vector holds them all: fold it with nothing.
    Lanes folded[1] = {fold<Width>(vectors[0], Lanes{})};
    sum_lanes<Count, Width / 2>(folded, sums);
  } else {
    constexpr int64_t kVectors = Count * Width / kLanes;
    Lanes folded[kVectors / 2];
    for (int64_t i = 0; i < kVectors / 2; ++i)
      folded[i] = fold<Width>(vectors[2 * i], vectors[2 * i + 1]);
    sum_lanes<Count, Width / 2>(folded, sums);
  }
}

template <typename Vector, typename Element>
inline Vector load(const Element* values) {
  Vector vector;
  std::memcpy(&vector, values, sizeof vector);
  return vector;
}

inline Lanes as_lanes(Words words) {
  Lanes lanes;
  std::memcpy(&lanes, &words, sizeof lanes);
  return lanes;
}

inline float bfloat16_value(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

constexpr int64_t kRows = 16;   // weight rows read together (a block), and prefetched ahead
constexpr int64_t kChunk = 4;   // input rows that share each weight vector, for a batch

// The kinds of weight rows. Each step of a row covers kParts * kLanes of its K elements, widened
// into kParts float32 vectors; x is laid out (`prepare`) so that part p of step s of a row is
// kLanes consecutive floats at x_row + s * kLanes * kParts + p * kLanes.

// What every kind shares: where step s of row n starts (a step of kParts vectors' worth of
// weights), and x as it is, which suits weights whose elements come in order.
template <typename Element, int64_t Parts>
struct WeightRows {
  static constexpr int64_t kParts = Parts;
  const Element* w;
  int64_t K;
  const Element* step(int64_t n, int64_t s) const { return w + n * K + s * kParts * kLanes; }
  static void prepare(const float* x, int64_t steps, float* prepared) {
    std::memcpy(prepared, x, steps * kParts * kLanes * sizeof(float));
  }
};

// float32: a step is one vector.
struct Float32Rows : WeightRows<float, 1> {
  void widen(int64_t n, int64_t s, Lanes* parts) const { parts[0] = load<Lanes>(step(n, s)); }
  float value(int64_t n, int64_t k) const { return w[n * K + k]; }
};

// bfloat16, read as pairs: a pair's low half shifted up is its even element and its high half,
// masked, its odd one; so x is prepared as the even elements of each 2 * kLanes, then the odd
// ones. A step is four vectors' worth: a cache line of a row in ymm registers, two in zmm ones
// (one alone streamed slower there).
struct BFloat16Rows : WeightRows<uint16_t, 4> {
  void widen(int64_t n, int64_t s, Lanes* parts) const {
    for (int64_t half = 0; half < 2; ++half) {
      const Words pairs = load<Words>(step(n, s) + half * 2 * kLanes);
      parts[2 * half] = as_lanes(pairs << 16);
      parts[2 * half + 1] = as_lanes(pairs & 0xFFFF0000u);
    }
  }
  float value(int64_t n, int64_t k) const { return bfloat16_value(w[n * K + k]); }
  static void prepare(const float* x, int64_t steps, float* prepared) {
    for (int64_t s = 0; s < 2 * steps; ++s)
      for (int64_t l = 0; l < kLanes; ++l) {
        prepared[s * 2 * kLanes + l] = x[s * 2 * kLanes + 2 * l];
        prepared[s * 2 * kLanes + kLanes + l] = x[s * 2 * kLanes + 2 * l + 1];
      }
  }
};

// int8 (scaled after the sum): a step is four vectors' worth, 64 weights (a cache line) in zmm
// registers, 32 in ymm ones.
struct Int8Rows : WeightRows<int8_t, 4> {
  // Where the CPU has AVX2 or VNNI, a few rows' int8 products are integer ones (below), so this
  // serves CPUs with neither.
  void widen(int64_t n, int64_t s, Lanes* parts) const {
    const int8_t* weights = step(n, s);
    float widened[4 * kLanes];  // a plain loop: compilers vectorize it better than a vector cast
    for (int64_t i = 0; i < 4 * kLanes; ++i) widened[i] = float(weights[i]);
    for (int64_t p = 0; p < 4; ++p) parts[p] = load<Lanes>(widened + p * kLanes);
  }
  float value(int64_t n, int64_t k) const { return float(w[n * K + k]); }
};

// Weight rows per pass over a chunk of input rows: as many as leave the chunk's sums, its input
// vectors and a row's widened weights in the vector registers (int8 widens in more); and per
// pass over one input row, whose sums may take half of them.
template <typename Weights>
constexpr int64_t kPassRows = std::is_same_v<Weights, Int8Rows> ? kRegisters / 16 : kRegisters / 8;
constexpr int64_t kOneRowPassRows = kRegisters / 2;

// sums[m][r] = x[m] . w[n0 + r] over the whole steps, for Chunk input rows m (prepared, row
// stride K) and Rows weight rows r, prefetching the rows kRows further on if asked.
template <int64_t Chunk, int64_t Rows, typename Weights>
void dot_steps(const Weights& weights, const float* x, int64_t steps, int64_t n0, bool prefetch,
               float* sums) {
  constexpr int64_t kParts = Weights::kParts;
  constexpr int64_t kStepBytes = kParts * kLanes * sizeof(*weights.w);
  Lanes acc[Chunk][Rows] = {};
  for (int64_t s = 0; s < steps; ++s) {
    Lanes xs[Chunk][kParts];
    for (int64_t m = 0; m < Chunk; ++m)
      for (int64_t p = 0; p < kParts; ++p)
        xs[m][p] = load<Lanes>(x + m * weights.K + (s * kParts + p) * kLanes);
    for (int64_t r = 0; r < Rows; ++r) {
      if (prefetch) {  // the step's lines (two of bfloat16), into L2: the rows at work fill L1
        const char* coming = reinterpret_cast<const char*>(weights.step(n0 + r + kRows, s));
        __builtin_prefetch(coming, 0, 2);
        if constexpr (kStepBytes > 64) __builtin_prefetch(coming + 64, 0, 2);
      }
      Lanes parts[kParts];
      weights.widen(n0 + r, s, parts);
      for (int64_t m = 0; m < Chunk; ++m)
        for (int64_t p = 0; p < kParts; ++p) acc[m][r] += parts[p] * xs[m][p];
    }
  }
  sum_lanes<Chunk * Rows>(&acc[0][0], sums);
}

// y[m, r] = x[m] . w[n0 + r] for all M input rows and a group of `rows` (at most Rows) weight
// rows (y's rows `stride` apart): Rows of them in vectors (the input rows four at a time, then
// one at a time), the rest of each row, and fewer rows, one element at a time.
template <int64_t Rows, typename Weights>
void group_products(const Weights& weights, int64_t n0, int64_t rows, const float* x,
                    const float* prepared, int64_t M, bool prefetch, float* y, int64_t stride) {
  const int64_t K = weights.K;
  const int64_t steps = rows == Rows ? K / (kLanes * Weights::kParts) : 0;
  const int64_t tail = steps * kLanes * Weights::kParts;
  constexpr int64_t kPass = kPassRows<Weights>;
  float sums[kChunk * Rows];
  int64_t m = 0;
  for (; steps > 0 && m + kChunk <= M; m += kChunk)
    for (int64_t part = 0; part < Rows; part += kPass) {
      dot_steps<kChunk, kPass>(weights, prepared + m * K, steps, n0 + part, prefetch && m == 0,
                               sums);
      for (int64_t c = 0; c < kChunk; ++c)
        for (int64_t r = 0; r < kPass; ++r) y[(m + c) * stride + part + r] = sums[c * kPass + r];
    }
  // One input row alone reads bfloat16 and int8 blocks a weight row at a time: one stream, which
  // the hardware prefetcher follows better than several rows side by side, with a step's parts
  // as independent sums (float32's one vector a step would leave one). Rows left over from a
  // batch's chunks share the rows at work in a pass.
  const bool alone = M == 1 && Weights::kParts > 1;
  for (; m < M; ++m) {
    constexpr int64_t kOnePass = std::min(Rows, kOneRowPassRows);
    for (int64_t part = 0; steps > 0 && part < Rows; part += alone ? 1 : kOnePass) {
      if (alone)
        dot_steps<1, 1>(weights, prepared, steps, n0 + part, prefetch, sums + part);
      else
        dot_steps<1, kOnePass>(weights, prepared + m * K, steps, n0 + part, prefetch && m == 0,
                               sums + part);
    }
    for (int64_t r = 0; r < rows; ++r) y[m * stride + r] = steps > 0 ? sums[r] : 0.0f;
  }
  for (int64_t c = 0; c < M; ++c)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = tail; k < K; ++k)
        y[c * stride + r] += weights.value(n0 + r, k) * x[c * K + k];
}

// More input rows than a chunk (a prompt's tokens) make a GEMM, computed as outer products:
// the input rows transposed into panels of two vectors' worth of rows side by side at each k,
// and a tile of weight rows (upcast to float32 once per block) whose weight at k, broadcast,
// multiplies the panel's two vectors at k into the tile's sums, which stay in registers for the
// whole of K. A panel and a block of weight rows both stay in L2 while the other passes.
constexpr int64_t kPanelVectors = 2;
constexpr int64_t kPanelRows = kPanelVectors * kLanes;  // input rows in a panel
// Weight rows in a tile: as many as leave a vector register each for the panel's vectors and
// the broadcast weight (6 of ymm registers, 14 of zmm ones).
constexpr int64_t kTileRows = (kRegisters - kPanelVectors - 1) / kPanelVectors;

// The input rows x [M, K] transposed into panels: panel p holds rows p * kPanelRows on, as
// `vectors` vectors at each k (two, or one for a last panel of kLanes rows or fewer), rows past
// M zero.
struct Panels {
  std::vector<float> values;
  int64_t M, K;
  int64_t count() const { return (M + kPanelRows - 1) / kPanelRows; }
  int64_t vectors(int64_t p) const {
    return std::min(kPanelVectors, (M - p * kPanelRows + kLanes - 1) / kLanes);
  }
  const float* panel(int64_t p) const { return values.data() + p * kPanelRows * K; }
};

Panels transposed(const float* x, int64_t M, int64_t K) {
  Panels panels{{}, M, K};
  panels.values.assign(panels.count() * kPanelRows * K, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t p = m / kPanelRows, width = panels.vectors(p) * kLanes;
    float* panel = panels.values.data() + p * kPanelRows * K;
    for (int64_t k = 0; k < K; ++k) panel[k * width + m % kPanelRows] = x[m * K + k];
  }
  return panels;
}

// y[m0 + i, r] = panel row i . w[r], for the panel's rows below M and Tile weight rows (float32,
// row stride K; y's rows `stride` apart).
template <int64_t Tile, int64_t Vectors>
void tile_products(const float* w, int64_t K, const float* panel, int64_t m0, int64_t M,
                   float* y, int64_t stride) {
  Lanes acc[Tile][Vectors] = {};
  for (int64_t k = 0; k < K; ++k) {
    Lanes xs[Vectors];
    for (int64_t v = 0; v < Vectors; ++v) xs[v] = load<Lanes>(panel + (k * Vectors + v) * kLanes);
    for (int64_t r = 0; r < Tile; ++r) {
      const float weight = w[r * K + k];
      for (int64_t v = 0; v < Vectors; ++v) acc[r][v] += weight * xs[v];
    }
  }
  for (int64_t r = 0; r < Tile; ++r)
    for (int64_t v = 0; v < Vectors; ++v)
      for (int64_t lane = 0; lane < kLanes && m0 + v * kLanes + lane < M; ++lane)
        y[(m0 + v * kLanes + lane) * stride + r] = acc[r][v][lane];
}

// tile_products for `tile` weight rows (at most Tile) and a panel of `vectors` vectors.
template <int64_t Tile = kTileRows>
void tile_products(int64_t tile, int64_t vectors, const float* w, int64_t K, const float* panel,
                   int64_t m0, int64_t M, float* y, int64_t stride) {
  if constexpr (Tile > 1) {
    if (tile < Tile)
      return tile_products<Tile - 1>(tile, vectors, w, K, panel, m0, M, y, stride);
  }
  if (vectors == kPanelVectors)
    tile_products<Tile, kPanelVectors>(w, K, panel, m0, M, y, stride);
  else
    tile_products<Tile, 1>(w, K, panel, m0, M, y, stride);
}

// The block's weight rows widened to float32, in order.
template <typename Weights>
void widen_block(const Weights& weights, int64_t n0, int64_t rows, float* widened) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < weights.K; ++k) widened[r * weights.K + k] = weights.value(n0 + r, k);
}

// A block's products with many input rows: each panel in turn over the block's rows, a tile at
// a time; float32 rows read where they are, others widened first (once, not once per panel).
template <typename Weights>
void gemm_block(const Weights& weights, int64_t n0, int64_t rows, const Panels& panels,
                float* widened, float* y, int64_t stride) {
  const int64_t K = weights.K;
  const float* w = widened;
  if constexpr (std::is_same_v<Weights, Float32Rows>)
    w = weights.w + n0 * K;
  else
    widen_block(weights, n0, rows, widened);
  for (int64_t p = 0; p < panels.count(); ++p)
    for (int64_t r = 0; r < rows; r += kTileRows)
      tile_products(std::min(kTileRows, rows - r), panels.vectors(p), w + r * K, K,
                    panels.panel(p), p * kPanelRows, panels.M, y + r, stride);
}

// Every block, split among torch's threads, then finish(y, n0, rows) on it while it is in
// cache: for a few input rows, x prepared for the kind of weights first; for more, a GEMM over
// x's panels.
template <typename Weights, typename Finish>
at::Tensor products(const Weights& weights, const at::Tensor& rows, int64_t N,
                    const Finish& finish) {
  const int64_t M = rows.size(0), K = rows.size(1);
  const int64_t steps = K / (kLanes * Weights::kParts);
  const float* x = rows.const_data_ptr<float>();
  const bool gemm = M > kChunk;
  std::vector<float> prepared(gemm ? 0 : M * K);
  for (int64_t m = 0; m < M && !gemm; ++m)
    Weights::prepare(x + m * K, steps, prepared.data() + m * K);
  const Panels panels = gemm ? transposed(x, M, K) : Panels{{}, 0, K};
  at::Tensor y = at::empty({M, N}, rows.options());
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, (N + kRows - 1) / kRows, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> widened(gemm ? kRows * K : 0);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kRows, block_rows = std::min(kRows, N - n0);
      if (gemm)
        gemm_block(weights, n0, block_rows, panels, widened.data(), yp + n0, N);
      else
        group_products<kRows>(weights, n0, block_rows, x, prepared.data(), M,
                              n0 + 2 * kRows <= N, yp + n0, N);
      finish(yp, n0, block_rows);
    }
  });
  return y;
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

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight) {
  const at::Tensor rows = float_rows(x);
  const int64_t K = rows.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K && weight.is_contiguous() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "row products take a contiguous float32 or bfloat16 weight [out, ", K, "], got ",
              weight.sizes(), " ", weight.scalar_type());
  const auto done = [](float*, int64_t, int64_t) {};
  if (weight.scalar_type() == at::kFloat)
    return products(Float32Rows{{weight.const_data_ptr<float>(), K}}, rows, weight.size(0), done);
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(weight.const_data_ptr());
  return products(BFloat16Rows{{bits, K}}, rows, weight.size(0), done);
}

#if defined(__AVX512VNNI__)
// int8 weights times input rows split into int8 digits: x ~= sum_d scale[d] * digit[d], each
// digit rounding what the ones before it left, on a scale 254 times finer. What the digits miss
// is at most half the last scale: max|x| / 2 / 127 / 254 = max|x| / 64,516 for each element of
// two digits, below a bfloat16 input's own rounding for elements within a factor 126 of the
// largest, and 254 times finer than the int8 weights' own rounding (half a step of
// max|w| / 127); a third digit, which float32 rows would need to keep float32's precision,
// would buy nothing the weights keep, and measured 7% slower.
constexpr int64_t kDigits = 2;
constexpr int64_t kDigitPassRows = 8;  // weight rows whose sums for every digit stay in registers

struct DigitRow {
  float scales[kDigits];
  int32_t sums[kDigits];  // of each digit over the whole steps, for the weights' offset of 128
  bool finite;            // if not, nor are the row's products (digits cannot carry NaN or inf)
};

// The digits of x (K elements), 16 at a time where they come in whole vectors.
DigitRow split_into_digits(const float* x, int64_t K, int64_t whole, int8_t* digits) {
  const int64_t vectors = K / 16 * 16;
  __m512 top = _mm512_setzero_ps();
  __mmask16 not_finite = 0;  // x - x is NaN just where x is NaN or infinite
  for (int64_t k = 0; k < vectors; k += 16) {
    const __m512 value = _mm512_loadu_ps(x + k);
    top = _mm512_max_ps(top, _mm512_abs_ps(value));
    not_finite |= _mm512_cmp_ps_mask(_mm512_sub_ps(value, value), _mm512_setzero_ps(),
                                     _CMP_NEQ_UQ);
  }
  float largest = _mm512_reduce_max_ps(top);
  DigitRow row{};
  row.finite = not_finite == 0;
  for (int64_t k = vectors; k < K; ++k) {
    largest = std::max(largest, std::fabs(x[k]));
    row.finite = row.finite && std::isfinite(x[k]);
  }
  std::vector<float> rest(x, x + K);
  float scale = largest / 127.0f;
  for (int64_t d = 0; d < kDigits; ++d, scale /= 254.0f) {
    row.scales[d] = scale;
    const float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
    int8_t* digit = digits + d * K;
    __m512i count = _mm512_setzero_si512();
    for (int64_t k = 0; k < vectors; k += 16) {
      const __m512 left = _mm512_loadu_ps(&rest[k]);
      const __m512 rounded = _mm512_roundscale_ps(_mm512_mul_ps(left, _mm512_set1_ps(inverse)),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 value = _mm512_min_ps(_mm512_max_ps(rounded, _mm512_set1_ps(-127.0f)),
                                         _mm512_set1_ps(127.0f));
      const __m512i integer = _mm512_cvtps_epi32(value);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(digit + k), _mm512_cvtepi32_epi8(integer));
      _mm512_storeu_ps(&rest[k], _mm512_fnmadd_ps(value, _mm512_set1_ps(scale), left));
      if (k < whole) count = _mm512_add_epi32(count, integer);
    }
    row.sums[d] = _mm512_reduce_add_epi32(count);
    for (int64_t k = vectors; k < K; ++k) {
      const float value = std::clamp(std::nearbyint(rest[k] * inverse), -127.0f, 127.0f);
      digit[k] = int8_t(value);
      rest[k] = std::fma(-value, scale, rest[k]);
    }
  }
  return row;
}

// sums[r * kDigits + d] = (w[n0 + r] + 128) . digit[d] over the whole steps of 64, for Rows
// weight rows, prefetching the rows kRows further on if asked. The weights are offset to
// unsigned bytes, as the instruction takes them; each int32 lane sums K / 16 products of at
// most 255 * 127, so it cannot overflow.
template <int64_t Rows>
void digit_steps(const int8_t* w, int64_t K, int64_t steps, int64_t n0, const int8_t* digits,
                 bool prefetch, int32_t* sums) {
  __m512i acc[Rows][kDigits];
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t d = 0; d < kDigits; ++d) acc[r][d] = _mm512_setzero_si512();
  const __m512i offset = _mm512_set1_epi8(char(0x80));
  for (int64_t s = 0; s < steps; ++s) {
    __m512i digit[kDigits];
    for (int64_t d = 0; d < kDigits; ++d) digit[d] = _mm512_loadu_si512(digits + d * K + s * 64);
    for (int64_t r = 0; r < Rows; ++r) {
      const int8_t* line = w + (n0 + r) * K + s * 64;
      if (prefetch) __builtin_prefetch(line + kRows * K, 0, 2);
      const __m512i unsigned_weights = _mm512_xor_si512(_mm512_loadu_si512(line), offset);
      for (int64_t d = 0; d < kDigits; ++d)
        acc[r][d] = _mm512_dpbusd_epi32(acc[r][d], unsigned_weights, digit[d]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t d = 0; d < kDigits; ++d)
      sums[r * kDigits + d] = _mm512_reduce_add_epi32(acc[r][d]);
}

// y[m, n] = x[m] . q[n] for M input rows (x as given, and as digits), every block of weight rows
// split among torch's threads, each input row in turn over a block (the first prefetching the
// next), then finish(y, n0, rows) on it while it is in cache.
template <typename Finish>
at::Tensor digit_products(const int8_t* w, const at::Tensor& rows, int64_t N,
                          const Finish& finish) {
  const int64_t M = rows.size(0), K = rows.size(1), whole = K / 64 * 64;
  const float* x = rows.const_data_ptr<float>();
  std::vector<int8_t> digits(M * kDigits * K);
  std::vector<DigitRow> split;
  for (int64_t m = 0; m < M; ++m)
    split.push_back(split_into_digits(x + m * K, K, whole, &digits[m * kDigits * K]));
  at::Tensor y = at::empty({M, N}, rows.options());
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, (N + kRows - 1) / kRows, 4, [&](int64_t begin, int64_t end) {
    int32_t sums[kRows * kDigits];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kRows, block_rows = std::min(kRows, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* row_digits = &digits[m * kDigits * K];
        const bool prefetch = m == 0 && n0 + 2 * kRows <= N;
        if (block_rows == kRows) {
          for (int64_t r = 0; r < kRows; r += kDigitPassRows)
            digit_steps<kDigitPassRows>(w, K, K / 64, n0 + r, row_digits, prefetch,
                                        sums + r * kDigits);
        } else {
          for (int64_t r = 0; r < block_rows; ++r)
            digit_steps<1>(w, K, K / 64, n0 + r, row_digits, false, sums + r * kDigits);
        }
        for (int64_t r = 0; r < block_rows; ++r) {
          double dot = 0.0;
          for (int64_t d = 0; d < kDigits; ++d)
            dot += double(split[m].scales[d]) *
                   double(int64_t(sums[r * kDigits + d]) - 128 * int64_t(split[m].sums[d]));
          for (int64_t k = whole; k < K; ++k) dot += double(w[(n0 + r) * K + k]) * x[m * K + k];
          yp[m * N + n0 + r] = split[m].finite ? float(dot) : NAN;
        }
      }
      finish(yp, n0, block_rows);
    }
  });
  return y;
}
#endif

#if defined(__AVX2__) && !defined(__AVX512VNNI__)
// int8 weights times input rows rounded to int16, where the CPU has AVX2 but not VNNI: each 16
// weights sign-extended to int16 in one instruction and multiplied by the row's 16 elements in
// another, with pairs summed into int32 lanes (`vpmaddwd`), where widening them to float32 takes
// six; a weight row at a time, one stream for the hardware prefetcher. A row is rounded on a
// scale of max|x| / 32767, so each element is off by at most max|x| / 65534: as close as the
// two int8 digits of the VNNI path (max|x| / 64516), and far finer than the int8 weights' own
// rounding. The integer sums are exact. Written in ymm registers, so for AVX-512 without VNNI
// too.
constexpr int64_t kInt16Limit = 32767;
// Steps of 16 whose sums an int32 lane holds: each adds at most 2 * 128 * 32767 (2^23 - 2^8).
constexpr int64_t kExactSteps = 255;

struct Int16Row {
  float scale;
  bool finite;  // if not, nor are the row's products (int16 cannot carry NaN or inf)
};

// x rounded to int16 on its own scale, 16 elements at a time where they come in whole vectors.
Int16Row round_to_int16(const float* x, int64_t K, int16_t* rounded) {
  const int64_t vectors = K / 16 * 16;
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 top = _mm256_setzero_ps(), not_finite = _mm256_setzero_ps();
  for (int64_t k = 0; k < vectors; k += 8) {
    const __m256 value = _mm256_loadu_ps(x + k);
    top = _mm256_max_ps(top, _mm256_and_ps(value, magnitude));
    // x - x is NaN just where x is NaN or infinite
    not_finite = _mm256_or_ps(not_finite, _mm256_cmp_ps(_mm256_sub_ps(value, value),
                                                         _mm256_setzero_ps(), _CMP_NEQ_UQ));
  }
  float tops[8];
  _mm256_storeu_ps(tops, top);
  float largest = *std::max_element(tops, tops + 8);
  bool finite = _mm256_movemask_ps(not_finite) == 0;
  for (int64_t k = vectors; k < K; ++k) {
    largest = std::max(largest, std::fabs(x[k]));
    finite = finite && std::isfinite(x[k]);
  }
  const float scale = largest / float(kInt16Limit);
  const float inverse = finite && scale > 0.0f ? 1.0f / scale : 0.0f;
  for (int64_t k = 0; k < vectors; k += 16) {
    // Rounded to nearest (the default), packed with saturation; packing interleaves the two
    // halves, which the permutation puts back in order.
    const __m256i low = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k),
                                                         _mm256_set1_ps(inverse)));
    const __m256i high = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8),
                                                          _mm256_set1_ps(inverse)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(rounded + k),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(low, high), 0xD8));
  }
  for (int64_t k = vectors; k < K; ++k)
    rounded[k] = int16_t(std::clamp(std::nearbyint(x[k] * inverse), -float(kInt16Limit),
                                    float(kInt16Limit)));
  return {scale, finite};
}

// w[n] . rounded over the whole steps of 16: a line of 64 weights at a time, its steps on two
// sums in turn, prefetching the line kRows rows further on if asked.
float int16_steps(const int8_t* w, int64_t K, int64_t n, const int16_t* rounded, bool prefetch) {
  const int8_t* row = w + n * K;
  const int64_t steps = K / 16, lines = K / 64;
  __m256 total = _mm256_setzero_ps();
  const auto step = [&](int64_t s, __m256i acc) {
    const __m256i wide = _mm256_cvtepi8_epi16(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + s * 16)));
    const __m256i xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rounded + s * 16));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(wide, xs));
  };
  const auto add = [&](__m256i acc) { total = _mm256_add_ps(total, _mm256_cvtepi32_ps(acc)); };
  constexpr int64_t kExactLines = kExactSteps / 2;  // two steps of a line on each of two sums
  for (int64_t first = 0; first < lines; first += kExactLines) {
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
    const int64_t last = std::min(lines, first + kExactLines);
    for (int64_t l = first; l < last; ++l) {
      if (prefetch) __builtin_prefetch(row + l * 64 + kRows * K, 0, 2);
      a = step(4 * l, a);
      b = step(4 * l + 1, b);
      a = step(4 * l + 2, a);
      b = step(4 * l + 3, b);
    }
    add(a);
    add(b);
  }
  __m256i rest = _mm256_setzero_si256();
  for (int64_t s = 4 * lines; s < steps; ++s) rest = step(s, rest);
  add(rest);
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
}

// y[m, n] = x[m] . q[n] for M input rows (as given, and rounded to int16), every block of
// weight rows split among torch's threads, each input row in turn over a block (the first
// prefetching the next), then finish(y, n0, rows) on it while it is in cache.
template <typename Finish>
at::Tensor int16_products(const int8_t* w, const at::Tensor& rows, int64_t N,
                          const Finish& finish) {
  const int64_t M = rows.size(0), K = rows.size(1), whole = K / 16 * 16;
  const float* x = rows.const_data_ptr<float>();
  std::vector<int16_t> rounded(M * K);
  std::vector<Int16Row> split;
  for (int64_t m = 0; m < M; ++m) split.push_back(round_to_int16(x + m * K, K, &rounded[m * K]));
  at::Tensor y = at::empty({M, N}, rows.options());
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, (N + kRows - 1) / kRows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kRows, block_rows = std::min(kRows, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        const bool prefetch = m == 0 && n0 + 2 * kRows <= N;
        for (int64_t r = 0; r < block_rows; ++r) {
          float dot = split[m].scale * int16_steps(w, K, n0 + r, &rounded[m * K], prefetch);
          for (int64_t k = whole; k < K; ++k) dot += float(w[(n0 + r) * K + k]) * x[m * K + k];
          yp[m * N + n0 + r] = split[m].finite ? dot : NAN;
        }
      }
      finish(yp, n0, block_rows);
    }
  });
  return y;
}
#endif

// Rows dequantizing as (q - zero_point) * scale: scale * (x . q - zero_point * sum(x)).
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& qdata,
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
  const float* sp = scales.const_data_ptr<float>();
  const int8_t* zero_int8 = int8_zeros ? zeros.const_data_ptr<int8_t>() : nullptr;
  const float* zero_float = int8_zeros ? nullptr : zeros.const_data_ptr<float>();
  const float* xp = rows.const_data_ptr<float>();
  std::vector<float> x_sums(M, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    Lanes partial[1] = {};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) partial[0] += load<Lanes>(xp + m * K + k);
    sum_lanes<1>(partial, &x_sums[m]);
    for (; k < K; ++k) x_sums[m] += xp[m * K + k];
  }
  const auto scale_rows = [&](float* y, int64_t n0, int64_t block_rows) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n0 + block_rows; ++n) {
        const float zero = zero_int8 ? float(zero_int8[n]) : zero_float[n];
        y[m * N + n] = sp[n] * (y[m * N + n] - zero * x_sums[m]);
      }
  };
#if defined(__AVX512VNNI__)
  if (K >= 64)
    return digit_products(qdata.const_data_ptr<int8_t>(), rows, N, scale_rows);
#elif defined(__AVX2__)
  if (M <= kChunk && K >= 16)  // more rows make a GEMM, arithmetic-bound, in float32
    return int16_products(qdata.const_data_ptr<int8_t>(), rows, N, scale_rows);
#endif
  return products(Int8Rows{{qdata.const_data_ptr<int8_t>(), K}}, rows, N, scale_rows);
}

}  // namespace

// How int8 products of a few rows are done here: "digits" (VNNI), "int16" (AVX2) or "widened".
std::string int8_gemv_way() {
#if defined(__AVX512VNNI__)
  return "digits";
#elif defined(__AVX2__)
  return "int16";
#else
  return "widened";
#endif
}

TORCH_LIBRARY(gpt2_decl, m) {
  m.def("gemv(Tensor x, Tensor weight) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor qdata, Tensor scale, Tensor zero_point) -> Tensor");
  m.def("int8_gemv_way() -> str", &int8_gemv_way);
}

TORCH_LIBRARY_IMPL(gpt2_decl, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("int8_gemv", &int8_gemv);
}
