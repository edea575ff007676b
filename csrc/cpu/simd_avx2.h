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
// - encode_states gives encode_fast's codes through one lookup per lane in
//   FastCodebook::entry16 (a bucket's base code and where in it the next threshold
//   lies, the positive floor built in) and one 16-bit comparison;
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
// Sampling mitigation also cut; the encoder's lookups (Encoder16) avoid gathers too.
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

// encode_fast, 8 lanes at a time, through FastCodebook::entry16: one lookup per lane and
// three vector instructions (codebook.h has the table's rule). The lanes' values y are
// in memory at `ymem` too: the entries of lanes 0-3 are looked up with indices taken out
// of the register (vmovq / vpextrq), those of lanes 4-7 with indices loaded from memory
// (each float's top half): the two ways use different ports, and together they beat
// either alone (a standalone benchmark of the block update, one thread, 1M elements:
// 1.88-1.89 ns per element, against 1.96-1.99 extracting every index and 1.91-1.92
// loading every one). Then, with the rank in the low 16 bits of R (flipped for negative
// values unless the table is rank_free) and all ones in its high 16 bits,
// max_epu16(R, E) == R holds in the high half always (base <= 255) and in the low half
// iff rank >= key: the comparison is -1 (a step) or 0xFFFF0000, and base minus it has
// the code in its low byte.
template <bool RankFree>
struct Encoder16 {
  const uint32_t* table;
  explicit Encoder16(const FastCodebook& fb) : table(fb.entry16) {}
  __m256i operator()(__m256 y, const float* ymem) const {
    const uint32_t* const t = table;
    const __m128i idx = _mm_srli_epi32(_mm_castps_si128(_mm256_castps256_ps128(y)), 16);
    const uint64_t i01 = static_cast<uint64_t>(_mm_cvtsi128_si64(idx));
    const uint64_t i23 = static_cast<uint64_t>(_mm_extract_epi64(idx, 1));
    __m128i lo = _mm_cvtsi32_si128(static_cast<int>(t[static_cast<uint32_t>(i01)]));
    lo = _mm_insert_epi32(lo, static_cast<int>(t[i01 >> 32]), 1);
    lo = _mm_insert_epi32(lo, static_cast<int>(t[static_cast<uint32_t>(i23)]), 2);
    lo = _mm_insert_epi32(lo, static_cast<int>(t[i23 >> 32]), 3);
    const auto top = [ymem](int k) {  // the top half of y[k], one 16-bit load (x86 is little-endian)
      uint16_t h;
      std::memcpy(&h, reinterpret_cast<const char*>(ymem + k) + 2, sizeof h);
      return h;
    };
    __m128i hi = _mm_cvtsi32_si128(static_cast<int>(t[top(4)]));
    hi = _mm_insert_epi32(hi, static_cast<int>(t[top(5)]), 1);
    hi = _mm_insert_epi32(hi, static_cast<int>(t[top(6)]), 2);
    hi = _mm_insert_epi32(hi, static_cast<int>(t[top(7)]), 3);
    const __m256i e = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
    const __m256i bits = _mm256_castps_si256(y);
    const __m256i ones_high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    const __m256i r = RankFree ? _mm256_or_si256(bits, ones_high)
                               : _mm256_or_si256(_mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31)), ones_high);
    const __m256i step = _mm256_cmpeq_epi16(_mm256_max_epu16(r, e), r);
    return _mm256_sub_epi32(_mm256_srli_epi32(e, 16), step);
  }
};

// 32 codes from the low bytes of the lanes of c0..c3, stored at out[0..32).
inline void store_codes32(uint8_t* out, __m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  const __m256i s0 = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                      0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i s1 = _mm256_setr_epi8(-1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1,
                                      -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i s2 = _mm256_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1,
                                      -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1);
  const __m256i s3 = _mm256_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12,
                                      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12);
  __m256i a = _mm256_or_si256(_mm256_or_si256(_mm256_shuffle_epi8(c0, s0), _mm256_shuffle_epi8(c1, s1)),
                              _mm256_or_si256(_mm256_shuffle_epi8(c2, s2), _mm256_shuffle_epi8(c3, s3)));
  a = _mm256_permutevar8x32_epi32(a, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), a);
}

// The codes of NS states of one block (n <= kBlockSize), as kernels.cpp's encode_block
// gives them: x * (1 / absmax), or x / absmax when the reciprocal of a subnormal absmax
// is not finite; state by state: the block scaled into a stack buffer first (lanes past
// n hold 0), then 32 lanes at a time (8 in the tail), the 32 codes stored at once.
template <int NS>
void encode_states(const float* const* x, int64_t n, const float* absmax, const FastCodebook* const* books,
                   uint8_t* const* codes) {
  alignas(32) float y[kBlockSize];
  for (int s = 0; s < NS; ++s) {
    const float* const in = x[s];
    uint8_t* const out = codes[s];
    const float inv = inverse_absmax(absmax[s]);
    const bool divide = !finite_bits(inv);
    const __m256 scale = _mm256_set1_ps(divide ? absmax[s] : inv);
    int64_t i = 0;
    if (divide) {
      for (; i + kLanes <= n; i += kLanes) _mm256_store_ps(y + i, _mm256_div_ps(_mm256_loadu_ps(in + i), scale));
      if (i < n) _mm256_store_ps(y + i, _mm256_div_ps(load(in + i, lanes(n - i)), scale));
    } else {
      for (; i + kLanes <= n; i += kLanes) _mm256_store_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(in + i), scale));
      if (i < n) _mm256_store_ps(y + i, _mm256_mul_ps(load(in + i, lanes(n - i)), scale));
    }
    const auto each = [&](const auto& encode) {
      int64_t j = 0;
      for (; j + 4 * kLanes <= n; j += 4 * kLanes) {
        store_codes32(out + j, encode(_mm256_load_ps(y + j), y + j), encode(_mm256_load_ps(y + j + 8), y + j + 8),
                      encode(_mm256_load_ps(y + j + 16), y + j + 16), encode(_mm256_load_ps(y + j + 24), y + j + 24));
      }
      for (; j < n; j += kLanes) store_codes(out + j, lanes(n - j), encode(_mm256_load_ps(y + j), y + j));
    };
    if (books[s]->rank_free) {
      each(Encoder16<true>(*books[s]));
    } else {
      each(Encoder16<false>(*books[s]));
    }
  }
}

// kernels.cpp's row_sumsq lanes for one row: element i goes to lane i % 8, in order;
// non-finite and masked lanes add +0.0 (the same bits as the scalar loop). Whole chunks
// take no mask and clear their non-finite lanes without leaving the vector registers.
template <typename P>
void row_sumsq_lanes(const P* row, int64_t row_length, double* lane) {
  __m256d acc_low = _mm256_setzero_pd(), acc_high = _mm256_setzero_pd();
  const __m256i exponent = _mm256_set1_epi32(0x7f800000);
  const auto add = [&](__m256 raw) {
    const __m256i bits = _mm256_castps_si256(raw);
    const __m256 nonfinite = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(bits, exponent), exponent));
    const __m256 x = _mm256_andnot_ps(nonfinite, raw);
    const __m256d low = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
    const __m256d high = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
    acc_low = _mm256_add_pd(acc_low, _mm256_mul_pd(low, low));
    acc_high = _mm256_add_pd(acc_high, _mm256_mul_pd(high, high));
  };
  int64_t i = 0;
  for (; i + kLanes <= row_length; i += kLanes) add(load(row + i, kAll));
  if (i < row_length) add(load(row + i, lanes(row_length - i)));  // lanes past the end load as 0
  _mm256_storeu_pd(lane, acc_low);
  _mm256_storeu_pd(lane + 4, acc_high);
}

}  // namespace distopt::cpu::avx2

#endif  // DISTOPT_CPU_AVX2
