// A CPU encoder that finds the exact nearest code with one table lookup and one
// comparison instead of an 8-step binary search.
//
// Floats that share their top 16 bits (sign, exponent, 7 mantissa bits) form a
// bucket; for the dynamic maps every bucket holds at most one of the 255 thresholds
// (checked when the table is built), so the code of a value is the code of its
// bucket's smallest value, plus one if the value reaches that code's next threshold.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

#include "../common/quant.h"

namespace distopt::cpu {

// A gather-free encoder for SIMD lanes (simd_avx512.h's encode_segment_lanes), exact by
// construction. On each side of zero the thresholds, taken by increasing magnitude,
// fall into segments cut at a few "anchor" thresholds (for the dynamic maps: one per
// decade), such that the thresholds strictly inside a segment (its grid) are uniformly
// spaced up to a tiny error. A value's segment is found from its binade (a binade holds
// at most one anchor) and one comparison with that anchor; its code is then
// floor(x * slope + offset) from one fma, where the segment's line puts its k-th grid
// threshold at its lowest code + 1 + k within `delta`, clamped to the segment's codes
// at its far end (the gap to the next anchor is wider than the grid's step). The floor
// is read in fixed point: adding 1.5 * 2^10 to f (|f| < 500) leaves its value in the
// sum's bits with 13 fractional bits. When those fractional bits are neither 0x1FFF,
// 0, 1 nor 2, f lies at least `margin` = 1.5 * 2^-13 from an integer, and its floor is
// provably the exact count of thresholds at or below x (margin > delta + the fma's
// rounding, checked for every segment when built); the rare lanes nearer than that
// (values next to a threshold, and infinities and NaNs, whatever their payload) are
// referred to encode_fast. Zeros are encoded as -0 (the code of both zeros). The
// positive floor is built in: for a map that has one, the positive side counts from
// code 1 and leaves out the threshold below it. See encode_segments for the scalar
// transcription.
struct SegmentEncoder {
  static constexpr int kSlots = 16;  // segments per side: slot = side * kSlots + segment
  bool ok;                           // false: this map does not fit; the gather of `entry` serves it
  uint32_t exponent_low;             // binades (biased exponents) clamp to [low, low + 31]
  int32_t first_slot[2][32];         // [side][exponent % 32]: the slot its binade starts in
  float anchor[2 * kSlots];          // |x| >= anchor[slot]: x lies in slot + 1 (+inf: none)
  float slope[2 * kSlots];
  float offset[2 * kSlots];
  int32_t limit[2 * kSlots];         // the code at the far end (the highest on the positive
                                     // side, the lowest on the negative side), plus kFixedCode
  static constexpr float kFixed = 1536.0f;         // 1.5 * 2^10: the sum's last bit is 2^-13
  static constexpr uint32_t kFixedCode = 0x22600;  // the bits of kFixed, shifted right by 13
  static_assert(kFixedCode == 0x44C00000u >> 13 && (kFixedCode & 0xFFu) == 0, "kFixed's bits are 0x44C00000");
  static constexpr float kMargin = 0x1.8p-13f;
};

struct FastCodebook {
  Codebook book;
  float threshold[256];  // book.threshold, then +inf
  uint8_t positive_floor;  // 1 for maps starting at 0 (see quant.h's floor_positive), else 0
  uint8_t bucket[1 << 16];
  // The tables below are built only for the builds that read them: `entry` for the
  // vector builds, `compact` and `segments` for AVX-512, `entry16` for AVX2.
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
  // For the AVX2 encoder (simd_avx2.h's Encoder16): per bucket, base << 16 | key, and
  // the code of a value is (base + (rank >= key)) mod 256, rank = bucket_rank(bits).
  // That is `entry` with "never" (key 0x10000) written as base = code - 1, key 0 (always
  // one step up), and the positive floor built in for maps that start at 0: bucket 0 is
  // base 0, key 1 (+0 keeps code 0, every positive subnormal in it takes 1), and every
  // other finite positive bucket of code 0 is base 0, key 0 (code 1). Equal to
  // encode_fast for every float: checked when built at both ends of every bucket and on
  // both sides of its key (within a bucket the code steps up at most once); for the
  // dynamic maps also on all 2^32 floats (a standalone check, not run in CI).
  // rank_free: every negative bucket has key 0, so the code of a negative value does
  // not depend on its rank, which then needs no flip (the unsigned map).
  uint32_t entry16[1 << 16];
  bool rank_free;
  // The map's values as four byte planes (byte k of book.value[c] at plane[k][c]), for
  // decoding with byte permutes (simd_avx512.h's decode64).
  alignas(64) uint8_t plane[4][256];
  SegmentEncoder segments;
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

// SegmentEncoder's code for x, lane by lane as simd_avx512.h computes it, or -1 where
// it refers x to encode_fast (x is within `margin` of a threshold, or not finite).
inline int encode_segments(const SegmentEncoder& se, float x) {
  if (x != x) return -1;  // NaN (simd_avx512.h makes every NaN the default one, which is referred)
  if (x == 0.0f) x = -0.0f;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t magnitude_bits = bits & 0x7FFFFFFFu;
  float magnitude;
  std::memcpy(&magnitude, &magnitude_bits, sizeof magnitude);
  const uint32_t exponent = magnitude_bits >> 23;
  const uint32_t binade = exponent < se.exponent_low ? se.exponent_low
                          : exponent > se.exponent_low + 31 ? se.exponent_low + 31 : exponent;
  int slot = se.first_slot[bits >> 31][binade % 32];
  if (magnitude >= se.anchor[slot]) ++slot;
  const float f = std::fma(x, se.slope[slot], se.offset[slot]);
  const float fixed = f + SegmentEncoder::kFixed;
  uint32_t q;
  std::memcpy(&q, &fixed, sizeof q);
  if (((q + 1) & 0x1FFCu) == 0) return -1;  // the fraction's bits are 0x1FFF, 0, 1 or 2
  const int code = static_cast<int>(q >> 13);
  const int clamped = bits >> 31 ? std::max(code, se.limit[slot]) : std::min(code, se.limit[slot]);
  return clamped - static_cast<int>(SegmentEncoder::kFixedCode);
}

}  // namespace distopt::cpu
