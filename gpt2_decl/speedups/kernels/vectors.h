// Vectors of float32 lanes for the C++ kernels, in the compiler's vector extension (the
// machine's own vector registers under -march=native): how to add up the lanes of many, read
// and write float32 or bfloat16 elements, and take exponentials and largest lanes.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace gpt2_decl_kernels {

constexpr int64_t kLanes = 16;  // float32 lanes of a vector: 64 bytes, a cache line

typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint32_t Words __attribute__((vector_size(kLanes * sizeof(uint32_t))));

typedef int32_t Picks __attribute__((vector_size(kLanes * sizeof(int32_t))));

// Two vectors of sums spread over Width lanes each (kLanes / Width sums a vector) folded into one
// of sums over Width / 2 lanes: the first vector's sums, then the second's, the upper half of
// each sum's lanes added to the lower.
template <int64_t Width>
inline Lanes fold(Lanes first, Lanes second) {
  constexpr int64_t kSums = kLanes / Width;
  Picks low, high;
  for (int64_t j = 0; j < 2 * kSums; ++j)
    for (int64_t i = 0; i < Width / 2; ++i) {
      const int32_t from = int32_t(j < kSums ? j * Width : kLanes + (j - kSums) * Width) + i;
      low[j * (Width / 2) + i] = from;
      high[j * (Width / 2) + i] = from + Width / 2;
    }
  return __builtin_shuffle(first, second, low) + __builtin_shuffle(first, second, high);
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

// Elements read and written as float32 lanes or values, float32 or bfloat16 (bits).
typedef uint16_t Halves __attribute__((vector_size(kLanes * sizeof(uint16_t))));

inline Lanes lanes_at(const float* values) { return load<Lanes>(values); }

inline Lanes lanes_at(const uint16_t* bits) {
  return as_lanes(__builtin_convertvector(load<Halves>(bits), Words) << 16);
}

inline float value_at(const float* value) { return *value; }

inline float value_at(const uint16_t* bits) { return bfloat16_value(*bits); }

inline void store(float value, float* at) { *at = value; }

inline void store(float value, uint16_t* at) { *at = c10::BFloat16(value).x; }

// Lanes rounded to bfloat16 (to nearest, ties to even; NaN stays NaN), as c10::BFloat16 does.
inline Halves bfloat16_lanes(Lanes lanes) {
  Words bits;
  std::memcpy(&bits, &lanes, sizeof bits);
  const Words rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return __builtin_convertvector(lanes != lanes ? Words{} + 0x7FC0u : rounded, Halves);
}

// e^x lane by lane for x <= 0 (scores less the largest), as 2^k e^r with k = x / ln 2 rounded
// and |r| <= ln 2 / 2, e^r by Cephes' polynomial (within a few units in the last place of
// float32); below -87, where float32 runs out of normal numbers, as e^-87.
inline Lanes exp_lanes(Lanes x) {
  x = x < -87.0f ? Lanes{} - 87.0f : x;
  const Lanes shifted = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: k in the low bits
  const Lanes k = shifted - 12582912.0f;
  const Lanes r = x - k * 0.693359375f + k * 2.12194440e-4f;  // ln 2 in two parts
  Lanes p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  Words bits, powers;
  std::memcpy(&bits, &p, sizeof bits);
  std::memcpy(&powers, &shifted, sizeof powers);
  return as_lanes(bits + ((powers - 0x4B400000u) << 23));  // times 2^k, in the exponent
}

// The largest of the lanes, by folding the vector in halves.
inline float max_lanes(Lanes lanes) {
  constexpr Picks kHalves[4] = {{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7},
                                {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11},
                                {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13},
                                {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}};
  for (const Picks& across : kHalves) {
    const Lanes other = __builtin_shuffle(lanes, across);
    lanes = lanes > other ? lanes : other;
  }
  return lanes[0];
}

}  // namespace gpt2_decl_kernels
