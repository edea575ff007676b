// A CPU encoder that finds the exact nearest code with one table lookup and one
// comparison instead of an 8-step binary search.
//
// Floats that share their top 16 bits (sign, exponent, 7 mantissa bits) form a
// bucket; for the dynamic maps every bucket holds at most one of the 255 thresholds
// (checked when the table is built), so the code of a value is the code of its
// bucket's smallest value, plus one if the value reaches that code's next threshold.
#pragma once

#include <cstdint>
#include <cstring>

#include "../common/quant.h"

namespace distopt::cpu {

struct FastCodebook {
  Codebook book;
  float threshold[256];  // book.threshold, then +inf
  uint8_t positive_floor;  // 1 for maps starting at 0 (see quant.h's floor_positive), else 0
  uint8_t bucket[1 << 16];
  // For SIMD, bucket and threshold test in one 32-bit entry, read by one gather:
  // code | key << 8, where the value reaches the next threshold iff its low 16 bits,
  // flipped for negative values (so that they grow with the value), are >= key
  // (0x10000: never). Equivalent to encode_fast for every float (checked at build).
  uint32_t entry[1 << 16];
  // `entry` for the buckets of magnitudes below 2 (all a scaled state can reach, but for
  // rounding at absmax), in a table small enough to stay in L1: bucket b (top 16 bits)
  // of magnitude bucket m = b & 0x7FFF < kCompactHigh reads
  // compact[(b >> 15) * kCompactSize + max(m, kCompactLow) - kCompactLow]; every
  // bucket below kCompactLow (magnitudes under 2^-25, far below the smallest threshold)
  // has the entry of bucket kCompactLow. Checked for every bucket when built; if a map
  // broke that, `compact_ok` is false and only `entry` is used.
  static constexpr uint32_t kCompactLow = 102u << 7;   // the bucket of 2^-25
  static constexpr uint32_t kCompactHigh = 128u << 7;  // the bucket of 2.0
  static constexpr uint32_t kCompactSize = kCompactHigh - kCompactLow;
  bool compact_ok;
  uint32_t compact[2 * kCompactSize];
  // The map's values as four byte planes (byte k of book.value[c] at plane[k][c]), for
  // decoding with byte permutes (simd_avx512.h's decode64).
  alignas(64) uint8_t plane[4][256];
};

// A value's low 16 bits in increasing order of the value within its bucket.
inline uint32_t bucket_rank(uint32_t bits) { return (bits ^ (bits >> 31 ? 0xFFFFu : 0u)) & 0xFFFFu; }

// The table for `qmap`, built once per distinct map and cached (thread-safe).
const FastCodebook& fast_codebook(const float* qmap);

inline uint8_t encode_fast(const FastCodebook& fb, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint8_t code = fb.bucket[bits >> 16];
  const uint8_t nearest = static_cast<uint8_t>(code + (code < 255 && fb.threshold[code] <= x ? 1 : 0));
  return nearest == 0 && x > 0.0f ? fb.positive_floor : nearest;
}

}  // namespace distopt::cpu
