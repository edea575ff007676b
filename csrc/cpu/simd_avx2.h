// AVX2 building blocks for the CPU kernels (kernels.cpp), compiled only when the build
// targets AVX2 (_build.py defines DISTOPT_CPU_AVX2 with -mavx2 -mfma -mf16c): the same
// interface as simd_avx512.h, 8 lanes at a time, so that kernels.cpp's vector loops
// serve both.
//
// As there, every helper is a lane-by-lane transcription of its scalar counterpart, so
// a lane gets the bits the scalar code gives it (DESIGN §3.1):
// - V8 carries 8 fp32 lanes through optim_math.h's rules with the same correctly
//   rounded IEEE operations in the same order (no FMA: -ffp-contract=off);
// - `maximum` is the scalar `a > b ? a : b`;
// - encode_states gives encode_fast's codes through one lookup of FastCodebook's
//   32-bit entries (bucket code, and where in the bucket the next threshold lies), one
//   integer comparison and the positive floor;
// - AbsMax gives the scalar max_abs exactly (a NaN defers to the scalar fold).
// AVX2 has no mask registers: a Mask is a bit set (bit i for lane i). Loads and
// store_codes take a prefix mask (the lanes [0, n) of a chunk, from `lanes`); lanes
// past it are not read (they hold 0) or not written. The value stores take any mask
// and leave the other lanes untouched.
#pragma once

#if defined(DISTOPT_CPU_AVX2)

#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "codebook.h"
#include "dtype.h"

namespace distopt::cpu::avx2 {

constexpr int64_t kLanes = 8;
using Mask = uint32_t;
constexpr Mask kAll = 0xFF;

struct V8 {
  __m256 v;
};
using V = V8;

inline V8 operator+(V8 a, V8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline V8 operator-(V8 a, V8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline V8 operator*(V8 a, V8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline V8 operator/(V8 a, V8 b) { return {_mm256_div_ps(a.v, b.v)}; }
inline V8 operator+(V8 a, float b) { return a + V8{_mm256_set1_ps(b)}; }
inline V8 operator-(V8 a, float b) { return a - V8{_mm256_set1_ps(b)}; }
inline V8 operator*(V8 a, float b) { return a * V8{_mm256_set1_ps(b)}; }
inline V8 operator/(V8 a, float b) { return a / V8{_mm256_set1_ps(b)}; }
inline V8 operator+(float a, V8 b) { return V8{_mm256_set1_ps(a)} + b; }
inline V8 operator-(float a, V8 b) { return V8{_mm256_set1_ps(a)} - b; }
inline V8 operator*(float a, V8 b) { return V8{_mm256_set1_ps(a)} * b; }
inline V8 operator/(float a, V8 b) { return V8{_mm256_set1_ps(a)} / b; }
inline V8 sqrt(V8 a) { return {_mm256_sqrt_ps(a.v)}; }
// The scalar `a > b ? a : b`, lane by lane (preferred over optim_math.h's template).
inline V8 maximum(V8 a, V8 b) { return {_mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ))}; }

// The lanes [0, n) of a chunk, for n in [0, 8].
inline Mask lanes(int64_t n) { return n >= kLanes ? kAll : (Mask(1) << n) - 1u; }
inline int count(Mask m) { return __builtin_popcount(m); }

// All ones in the 32 bits of each lane of `m`.
inline __m256i lane_mask(Mask m) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), bit), bit);
}
inline Mask mask_of(__m256 lanes_true) { return static_cast<Mask>(_mm256_movemask_ps(lanes_true)); }
inline Mask mask_of(__m256i lanes_true) { return mask_of(_mm256_castsi256_ps(lanes_true)); }

inline V8 zero() { return {_mm256_setzero_ps()}; }
inline V8 keep(Mask m, V8 x) { return {_mm256_and_ps(_mm256_castsi256_ps(lane_mask(m)), x.v)}; }  // 0 elsewhere
inline V8 loadu(const float* x) { return {_mm256_loadu_ps(x)}; }
inline void storeu(float* out, V8 x) { _mm256_storeu_ps(out, x.v); }

// The first count(m) elements of x, the rest zero (no read past them).
template <typename T>
inline __m128i load_bits16(const T* x, Mask m) {
  if (m == kAll) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  alignas(16) uint16_t part[kLanes] = {};
  std::memcpy(part, x, sizeof(T) * count(m));
  return _mm_load_si128(reinterpret_cast<const __m128i*>(part));
}

// Exact conversions to fp32.
inline __m256 load(const float* x, Mask m) {
  return m == kAll ? _mm256_loadu_ps(x) : _mm256_maskload_ps(x, lane_mask(m));
}
inline __m256 load(const c10::BFloat16* x, Mask m) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load_bits16(x, m)), 16));
}
inline __m256 load(const c10::Half* x, Mask m) { return _mm256_cvtph_ps(load_bits16(x, m)); }

// Rounded stores from fp32, bitwise as the scalar to_param<P> (dtype.h) (other lanes untouched).
inline void store(float* out, Mask m, __m256 x) {
  if (m == kAll) {
    _mm256_storeu_ps(out, x);
  } else {
    _mm256_maskstore_ps(out, lane_mask(m), x);
  }
}
inline void store(c10::BFloat16* out, Mask m, __m256 x) {  // c10's round_to_nearest_even
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  // eight 16-bit values: packed within each 128-bit half, then the halves joined
  const __m128i halves = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08));
  if (m == kAll) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), halves);
    return;
  }
  alignas(16) uint16_t lane[kLanes];
  _mm_store_si128(reinterpret_cast<__m128i*>(lane), halves);
  for (int i = 0; i < kLanes; ++i) {
    if ((m >> i) & 1) std::memcpy(out + i, lane + i, sizeof lane[i]);
  }
}
inline void store(c10::Half* out, Mask m, __m256 x) {  // dtype.h's conversion, element by element
  alignas(32) float lane[kLanes];
  _mm256_store_ps(lane, x);
  for (int i = 0; i < kLanes; ++i) {
    if ((m >> i) & 1) out[i] = to_param<c10::Half>(lane[i]);
  }
}

// Whether any lane of `x` in `m` is infinite or NaN (the exponent field all ones).
inline Mask nonfinite(__m256 x, Mask m) {
  const __m256i exponent = _mm256_set1_epi32(0x7f800000);
  return m & mask_of(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x), exponent), exponent));
}

// max |x| on the magnitudes' bits, as simd_avx512.h's AbsMax (every NaN above +inf).
struct AbsMax {
  __m256i acc = _mm256_setzero_si256();
  void add(__m256 x, Mask m) {
    __m256i magnitude = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7FFFFFFF));
    if (m != kAll) magnitude = _mm256_and_si256(magnitude, lane_mask(m));  // a tail only
    acc = _mm256_max_epu32(acc, magnitude);
  }
  template <typename Scalar>
  float result(const float* x, int64_t n, Scalar scalar) const {
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
    const uint32_t bits = static_cast<uint32_t>(_mm_cvtsi128_si32(m));
    if (bits > 0x7F800000u) return scalar(x, n);  // a NaN
    float max;
    std::memcpy(&max, &bits, sizeof max);
    return max;
  }
};

// map[code] * scale for n codes; lanes past n decode code 0 and are stored too (the
// buffer has room for whole chunks). A chunk's eight codes come in one 8-byte load and
// leave it byte by byte in registers, then eight scalar loads of map[code] fill the
// lanes: on Zen 3 that took 0.76 of the time of eight byte loads (a standalone
// benchmark, 1.97-2.20 against 2.58-2.86 ns per 8 codes), and eight scalar loads take
// about 0.6 of the time of one vgatherdps (measured), whose speed Intel's Gather Data
// Sampling mitigation also cut; table_lookup below avoids gathers too.
inline void decode(const uint8_t* codes, int64_t n, const FastCodebook& fb, float scale, float* out) {
  const float* value = fb.book.value;
  const __m256 s = _mm256_set1_ps(scale);
  const auto chunk = [value, s](uint64_t c, float* to) {
    const uint32_t lo = static_cast<uint32_t>(c), hi = static_cast<uint32_t>(c >> 32);
    const __m256 v = _mm256_setr_ps(value[lo & 0xFF], value[(lo >> 8) & 0xFF], value[(lo >> 16) & 0xFF],
                                    value[lo >> 24], value[hi & 0xFF], value[(hi >> 8) & 0xFF],
                                    value[(hi >> 16) & 0xFF], value[hi >> 24]);
    _mm256_storeu_ps(to, _mm256_mul_ps(v, s));
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    uint64_t c;
    std::memcpy(&c, codes + i, sizeof c);  // byte k of the word is code i + k (x86 is little-endian)
    chunk(c, out + i);
  }
  if (i < n) {  // no read past the codes
    uint64_t c = 0;
    std::memcpy(&c, codes + i, n - i);
    chunk(c, out + i);
  }
}

// table[index] lane by lane, without vpgatherdd: the indices leave the register two
// at a time (vmovq / vpextrq), eight scalar loads fill the lanes (vpinsrd): on Zen 3,
// 0.6 of vpgatherdd's time (measured).
inline __m256i table_lookup(const uint32_t* table, __m256i index) {
  auto four = [table](__m128i half) {
    const uint64_t i01 = static_cast<uint64_t>(_mm_cvtsi128_si64(half));
    const uint64_t i23 = static_cast<uint64_t>(_mm_extract_epi64(half, 1));
    __m128i r = _mm_cvtsi32_si128(static_cast<int>(table[static_cast<uint32_t>(i01)]));
    r = _mm_insert_epi32(r, static_cast<int>(table[i01 >> 32]), 1);
    r = _mm_insert_epi32(r, static_cast<int>(table[static_cast<uint32_t>(i23)]), 2);
    return _mm_insert_epi32(r, static_cast<int>(table[i23 >> 32]), 3);
  };
  return _mm256_inserti128_si256(_mm256_castsi128_si256(four(_mm256_castsi256_si128(index))),
                                 four(_mm256_extracti128_si256(index, 1)), 1);
}

// encode_fast, lane by lane, through FastCodebook's 32-bit entries (as simd_avx512.h's
// `entries` and `encode_lanes`): one table_lookup in the L1-sized `compact`, or in
// `entry` when a lane lies outside it, one integer comparison and, for a map with one
// (Floor: positive_floor is 1), the positive floor. The table's fields are copied into
// the encoder once: the code stores (bytes, which may alias anything) would otherwise
// make the compiler reload them on every chunk. The integer comparisons are signed:
// every operand is below 2^31.
template <bool Floor>
struct LaneEncoder {
  const uint32_t* entry;
  const uint32_t* compact;  // null when the map does not fit it (compact_ok false)

  explicit LaneEncoder(const FastCodebook& fb) : entry(fb.entry), compact(fb.compact_ok ? fb.compact : nullptr) {}

  __m256i entries(__m256i bits) const {
    // a magnitude at or above kCompactHigh (2.0, inf, NaN) has the exponent's top bit
    static_assert(FastCodebook::kCompactHigh == 0x4000u, "the bucket of 2.0 is bit 30 of the float");
    const __m256i bucket = _mm256_srli_epi32(bits, 16);
    if (compact == nullptr || !_mm256_testz_si256(bits, _mm256_set1_epi32(0x40000000))) return table_lookup(entry, bucket);
    const __m256i magnitude = _mm256_and_si256(bucket, _mm256_set1_epi32(0x7FFF));
    const __m256i low = _mm256_set1_epi32(FastCodebook::kCompactLow);
    const __m256i slot = _mm256_add_epi32(_mm256_sub_epi32(_mm256_max_epi32(magnitude, low), low),
                                          _mm256_and_si256(_mm256_srai_epi32(bits, 31),
                                                           _mm256_set1_epi32(FastCodebook::kCompactSize)));
    return table_lookup(compact, slot);
  }

  __m256i operator()(__m256 x) const {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i entry = entries(bits);
    const __m256i code = _mm256_and_si256(entry, _mm256_set1_epi32(0xFF));
    const __m256i rank = _mm256_and_si256(_mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31)), _mm256_set1_epi32(0xFFFF));
    // rank >= key, as rank + 1 > key (both at most 0x10000); a true lane is -1
    const __m256i up = _mm256_cmpgt_epi32(_mm256_add_epi32(rank, _mm256_set1_epi32(1)), _mm256_srli_epi32(entry, 8));
    const __m256i nearest = _mm256_sub_epi32(code, up);
    if (!Floor) return nearest;  // the floor would give 0, which nearest is already
    const __m256i floor = _mm256_and_si256(_mm256_cmpeq_epi32(nearest, _mm256_setzero_si256()),
                                           _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ)));
    return _mm256_blendv_epi8(nearest, _mm256_set1_epi32(1), floor);
  }
};

// The low bytes of the lanes of `code` in the prefix mask m, stored at out (the bytes
// past them untouched).
inline void store_codes(uint8_t* out, Mask m, __m256i code) {
  const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                             0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i packed = _mm256_shuffle_epi8(code, low_bytes);
  const __m128i bytes = _mm_unpacklo_epi32(_mm256_castsi256_si128(packed), _mm256_extracti128_si256(packed, 1));
  if (m == kAll) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), bytes);
    return;
  }
  const uint64_t eight = static_cast<uint64_t>(_mm_cvtsi128_si64(bytes));
  std::memcpy(out, &eight, count(m));
}

// The codes of NS states of one block (n <= kBlockSize), as kernels.cpp's encode_block
// gives them: x * (1 / absmax), or x / absmax when the reciprocal of a subnormal absmax
// is not finite; state by state, 8 lanes at a time.
template <int NS>
void encode_states(const float* const* x, int64_t n, const float* absmax, const FastCodebook* const* books,
                   uint8_t* const* codes) {
  for (int s = 0; s < NS; ++s) {
    const float* const in = x[s];
    uint8_t* const out = codes[s];
    const float inv = inverse_absmax(absmax[s]);
    const auto each = [&](const auto& encode, auto scaled) {
      int64_t i = 0;
      for (; i + kLanes <= n; i += kLanes) store_codes(out + i, kAll, encode(scaled(_mm256_loadu_ps(in + i))));
      if (i < n) store_codes(out + i, lanes(n - i), encode(scaled(load(in + i, lanes(n - i)))));
    };
    const auto with_scale = [&](const auto& encode) {
      if (finite_bits(inv)) {
        const __m256 scale = _mm256_set1_ps(inv);
        each(encode, [scale](__m256 v) { return _mm256_mul_ps(v, scale); });
      } else {
        const __m256 scale = _mm256_set1_ps(absmax[s]);
        each(encode, [scale](__m256 v) { return _mm256_div_ps(v, scale); });
      }
    };
    if (books[s]->positive_floor != 0) {
      with_scale(LaneEncoder<true>(*books[s]));
    } else {
      with_scale(LaneEncoder<false>(*books[s]));
    }
  }
}

// kernels.cpp's row_sumsq lanes for one row: element i goes to lane i % 8, in order;
// non-finite and masked lanes add +0.0 (the same bits as the scalar loop).
template <typename P>
void row_sumsq_lanes(const P* row, int64_t row_length, double* lane) {
  __m256d acc_low = _mm256_setzero_pd(), acc_high = _mm256_setzero_pd();
  for (int64_t i = 0; i < row_length; i += kLanes) {
    const Mask m = lanes(row_length - i);
    const __m256 raw = load(row + i, m);
    const __m256 x = keep(m & ~nonfinite(raw, m), V8{raw}).v;
    const __m256d low = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
    const __m256d high = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
    acc_low = _mm256_add_pd(acc_low, _mm256_mul_pd(low, low));
    acc_high = _mm256_add_pd(acc_high, _mm256_mul_pd(high, high));
  }
  _mm256_storeu_pd(lane, acc_low);
  _mm256_storeu_pd(lane + 4, acc_high);
}

}  // namespace distopt::cpu::avx2

#endif  // DISTOPT_CPU_AVX2
