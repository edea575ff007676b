// AVX-512 building blocks for the CPU kernels (kernels.cpp), compiled only when
// the build targets AVX512 (_build.py defines DISTOPT_CPU_AVX512 with -mavx512f/bw/vl/dq).
//
// Every helper is a lane-by-lane transcription of its scalar counterpart, so a lane
// gets the bits the scalar code would give it (DESIGN §3.1):
// - V16 carries 16 fp32 lanes through optim_math.h's templated rules with the same IEEE
//   operations in the same order (vmulps, vaddps, vsubps, vdivps, vsqrtps are correctly
//   rounded like the scalar ones; no FMA is written in the update math, and
//   -ffp-contract=off keeps the compiler from forming one);
// - `maximum` is the scalar `a > b ? a : b` (a NaN in `a` yields `b`);
// - encode_states gives encode_fast's codes: by codebook.h's SegmentEncoder
//   (no gather: permutes and one fma, whose result only picks the code and is proven
//   exact where it is used; lanes next to a threshold are referred to encode_fast), or
//   for a map that does not fit it, one gather of FastCodebook::entry (bucket code and
//   where in the bucket the next threshold lies), one integer comparison, the positive
//   floor;
// - AbsMax gives the scalar max_abs exactly: without NaN, a maximum does not depend on
//   the order; with a NaN (whose scalar result depends on its position) it defers to
//   the scalar fold.
// Lanes past a block's end are masked: loaded as zeros, never stored to the tensors
// (the kernels' stack buffers take whole chunks).
#pragma once

#if defined(DISTOPT_CPU_AVX512)

#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "codebook.h"
#include "dtype.h"

namespace distopt::cpu::avx512 {

constexpr int64_t kLanes = 16;

struct V16 {
  __m512 v;
};
using V = V16;
using Mask = __mmask16;  // bit i for lane i
constexpr Mask kAll = 0xFFFF;

inline V16 operator+(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V16 operator-(V16 a, V16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V16 operator*(V16 a, V16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V16 operator/(V16 a, V16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline V16 operator+(V16 a, float b) { return a + V16{_mm512_set1_ps(b)}; }
inline V16 operator-(V16 a, float b) { return a - V16{_mm512_set1_ps(b)}; }
inline V16 operator*(V16 a, float b) { return a * V16{_mm512_set1_ps(b)}; }
inline V16 operator/(V16 a, float b) { return a / V16{_mm512_set1_ps(b)}; }
inline V16 operator+(float a, V16 b) { return V16{_mm512_set1_ps(a)} + b; }
inline V16 operator-(float a, V16 b) { return V16{_mm512_set1_ps(a)} - b; }
inline V16 operator*(float a, V16 b) { return V16{_mm512_set1_ps(a)} * b; }
inline V16 operator/(float a, V16 b) { return V16{_mm512_set1_ps(a)} / b; }
inline V16 sqrt(V16 a) { return {_mm512_sqrt_ps(a.v)}; }
// The scalar `a > b ? a : b`, lane by lane (preferred over optim_math.h's template).
inline V16 maximum(V16 a, V16 b) { return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ), b.v, a.v)}; }

// The lanes [0, n) of a chunk, for n in [0, 16].
inline __mmask16 lanes(int64_t n) {
  return n >= kLanes ? kAll : __mmask16((1u << n) - 1u);
}
inline int count(Mask m) { return __builtin_popcount(static_cast<unsigned>(m)); }

inline V16 zero() { return {_mm512_setzero_ps()}; }
inline V16 loadu(const float* x) { return {_mm512_loadu_ps(x)}; }
inline void storeu(float* out, V16 x) { _mm512_storeu_ps(out, x.v); }

// Exact conversions to fp32 (masked lanes read nothing and hold 0).
inline __m512 load(const float* x, __mmask16 m) { return _mm512_maskz_loadu_ps(m, x); }
inline __m512 load(const c10::BFloat16* x, __mmask16 m) {
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}
inline __m512 load(const c10::Half* x, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, x)); }

// Rounded stores from fp32, bitwise as the scalar to_param<P> (dtype.h) (masked lanes untouched).
inline void store(float* out, __mmask16 m, __m512 x) { _mm512_mask_storeu_ps(out, m, x); }
inline void store(c10::BFloat16* out, __mmask16 m, __m512 x) {  // c10's round_to_nearest_even
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm512_mask_cvtepi32_storeu_epi16(out, m, rounded);
}
inline void store(c10::Half* out, __mmask16 m, __m512 x) {  // dtype.h's conversion, element by element
  alignas(64) float lane[kLanes];
  _mm512_store_ps(lane, x);
  for (int i = 0; i < kLanes; ++i) {
    if ((m >> i) & 1) out[i] = to_param<c10::Half>(lane[i]);
  }
}

// max |x| accumulated 16 lanes at a time, equal to kernels.cpp's scalar `max_abs` over
// the same values: without NaN a maximum does not depend on the order; with one (whose
// scalar result depends on its position) `result` defers to the scalar fold. The
// maximum is taken on the magnitudes' bits, whose unsigned order is the order of the
// values, with every NaN above +inf (two integer operations a vector).
struct AbsMax {
  __m512i acc = _mm512_setzero_si512();
  void add(__m512 x, __mmask16 m) {
    acc = _mm512_mask_max_epu32(acc, m, acc, _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF)));
  }
  template <typename Scalar>
  float result(const float* x, int64_t n, Scalar scalar) const {
    const uint32_t bits = _mm512_reduce_max_epu32(acc);
    if (bits > 0x7F800000u) return scalar(x, n);  // a NaN
    float max;
    std::memcpy(&max, &bits, sizeof max);
    return max;
  }
};

// Whether any lane of `x` in `m` is infinite or NaN (the exponent field all ones).
inline __mmask16 nonfinite(__m512 x, __mmask16 m) {
  const __m512i exponent = _mm512_set1_epi32(0x7f800000);
  return _mm512_mask_cmpeq_epi32_mask(m, _mm512_and_si512(_mm512_castps_si512(x), exponent), exponent);
}

// table[index] for a 256-entry table held in 16 registers: eight two-register
// permutes (index bits 0-4) and a blend tree on bits 5, 6, 7 (cheaper than a gather).
inline __m512 lookup256(const __m512* t, __m512i index) {
  __m512 r[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm512_permutex2var_ps(t[2 * k], index, t[2 * k + 1]);
  for (int bit = 32, width = 8; bit <= 128; bit *= 2, width /= 2) {
    const __mmask16 high = _mm512_test_epi32_mask(index, _mm512_set1_epi32(bit));
    for (int k = 0; k < width / 2; ++k) r[k] = _mm512_mask_blend_ps(high, r[2 * k], r[2 * k + 1]);
  }
  return r[0];
}

// map[code] * scale for n codes; lanes past n decode code 0 and are stored too (the
// buffer has room for whole chunks).
inline void decode16(const uint8_t* codes, int64_t n, const float* value, float scale, float* out) {
  __m512 table[16];
  for (int k = 0; k < 16; ++k) table[k] = _mm512_loadu_ps(value + 16 * k);
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += kLanes) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes(n - i), codes + i));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(lookup256(table, c), s));
  }
}

#if defined(DISTOPT_CPU_VBMI)
// decode16's result, 64 codes at a time with AVX512-VBMI byte permutes: each of the four
// byte planes of the map (FastCodebook::plane) is a 256-entry byte lookup (two 128-byte
// two-register permutes, chosen by the code's top bit); unpacking the planes rebuilds
// the fp32 values exactly. Unpacks work within 128-bit lanes, so the codes are first
// reordered (plane position 16k + 4r + i holds code 16r + 4k + i) for the floats to come
// out in order. Lanes past n decode code 0 and are stored too, as in decode16.
inline void decode64(const uint8_t* codes, int64_t n, const FastCodebook& fb, float scale, float* out) {
  alignas(64) static const uint8_t kOrder[64] = {
      0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55,
      8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
  const __m512i order = _mm512_load_si512(kOrder);
  __m512i table[4][4];
  for (int k = 0; k < 4; ++k) {
    for (int q = 0; q < 4; ++q) table[k][q] = _mm512_load_si512(fb.plane[k] + 64 * q);
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 64) {
    const __mmask64 m = n - i >= 64 ? ~__mmask64(0) : (__mmask64(1) << (n - i)) - 1;
    const __m512i c = _mm512_permutexvar_epi8(order, _mm512_maskz_loadu_epi8(m, codes + i));
    const __mmask64 high = _mm512_movepi8_mask(c);
    __m512i b[4];
    for (int k = 0; k < 4; ++k) {
      b[k] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(table[k][0], c, table[k][1]),
                                    _mm512_permutex2var_epi8(table[k][2], c, table[k][3]));
    }
    const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
    const __m512i r[4] = {_mm512_unpacklo_epi16(lo01, lo23), _mm512_unpackhi_epi16(lo01, lo23),
                          _mm512_unpacklo_epi16(hi01, hi23), _mm512_unpackhi_epi16(hi01, hi23)};
    for (int q = 0; q < 4; ++q) _mm512_storeu_ps(out + i + 16 * q, _mm512_mul_ps(_mm512_castsi512_ps(r[q]), s));
  }
}
#endif

// map[code] * scale for n codes, the fastest way this build has.
inline void decode(const uint8_t* codes, int64_t n, const FastCodebook& fb, float scale, float* out) {
#if defined(DISTOPT_CPU_VBMI)
  decode64(codes, n, fb, scale, out);
#else
  decode16(codes, n, fb.book.value, scale, out);
#endif
}

// FastCodebook entries for the lanes of `bits`: one gather from the L1-sized `compact`
// table, or from the whole `entry` table when a lane lies outside it (|x| >= 2, inf, NaN).
inline __m512i entries(const FastCodebook& fb, __m512i bits) {
  const __m512i bucket = _mm512_srli_epi32(bits, 16);
  const __m512i magnitude = _mm512_and_si512(bucket, _mm512_set1_epi32(0x7FFF));
  const __mmask16 outside = _mm512_cmpge_epu32_mask(magnitude, _mm512_set1_epi32(FastCodebook::kCompactHigh));
  if (!fb.compact_ok || outside != 0) return _mm512_i32gather_epi32(bucket, fb.entry, 4);
  const __m512i low = _mm512_set1_epi32(FastCodebook::kCompactLow);
  const __m512i slot = _mm512_add_epi32(_mm512_sub_epi32(_mm512_max_epu32(magnitude, low), low),
                                        _mm512_and_si512(_mm512_srai_epi32(bits, 31),
                                                         _mm512_set1_epi32(FastCodebook::kCompactSize)));
  return _mm512_i32gather_epi32(slot, fb.compact, 4);
}

// encode_fast, lane by lane, through FastCodebook's entries (one gather).
inline __m512i encode_lanes(const FastCodebook& fb, __m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i entry = entries(fb, bits);
  const __m512i code = _mm512_and_si512(entry, _mm512_set1_epi32(0xFF));
  const __m512i rank = _mm512_and_si512(_mm512_xor_si512(bits, _mm512_srai_epi32(bits, 31)), _mm512_set1_epi32(0xFFFF));
  const __mmask16 up = _mm512_cmpge_epu32_mask(rank, _mm512_srli_epi32(entry, 8));
  const __m512i nearest = _mm512_mask_add_epi32(code, up, code, _mm512_set1_epi32(1));
  const __mmask16 floor = _mm512_cmpeq_epi32_mask(nearest, _mm512_setzero_si512()) &
                          _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
  return _mm512_mask_mov_epi32(nearest, floor, _mm512_set1_epi32(fb.positive_floor));
}

// SegmentEncoder's tables in registers: each 32-entry table in two, read by
// two-register permutes (which use an index's low five bits).
struct SegmentLanes {
  __m512i first[2][2];  // [side]: first_slot by binade % 32
  __m512 anchor[2], slope[2], offset[2];
  __m512i limit[2];
  __m512i exponent_low, exponent_high;

  SegmentLanes() = default;
  explicit SegmentLanes(const SegmentEncoder& se) {
    for (int h = 0; h < 2; ++h) {
      for (int side = 0; side < 2; ++side) first[side][h] = _mm512_loadu_si512(se.first_slot[side] + 16 * h);
      anchor[h] = _mm512_loadu_ps(se.anchor + 16 * h);
      slope[h] = _mm512_loadu_ps(se.slope + 16 * h);
      offset[h] = _mm512_loadu_ps(se.offset + 16 * h);
      limit[h] = _mm512_loadu_si512(se.limit + 16 * h);
    }
    exponent_low = _mm512_set1_epi32(static_cast<int>(se.exponent_low));
    exponent_high = _mm512_set1_epi32(static_cast<int>(se.exponent_low + 31));
  }
};

// codebook.h's encode_segments, lane by lane: no gather, one fma. `refer` gets the
// lanes it refers to encode_fast (their codes here are meaningless).
inline __m512i encode_segment_lanes(const SegmentLanes& t, __m512 x, __mmask16& refer) {
  // +0 and -0 to -0 (vfixupimm's token 7 for the zero class), every NaN to the default
  // NaN (token 3), which the fixed-point test below always refers; other values as they are
  x = _mm512_fixupimm_ps(x, x, _mm512_set1_epi32(0x11111733), 0);
  const __m512i bits = _mm512_castps_si512(x);
  const __mmask16 negative = _mm512_movepi32_mask(bits);
  const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i binade = _mm512_min_epu32(_mm512_max_epu32(_mm512_srli_epi32(magnitude, 23), t.exponent_low),
                                          t.exponent_high);
  __m512i slot = _mm512_mask_blend_epi32(negative, _mm512_permutex2var_epi32(t.first[0][0], binade, t.first[0][1]),
                                         _mm512_permutex2var_epi32(t.first[1][0], binade, t.first[1][1]));
  const __mmask16 beyond = _mm512_cmp_ps_mask(_mm512_castsi512_ps(magnitude),
                                              _mm512_permutex2var_ps(t.anchor[0], slot, t.anchor[1]), _CMP_GE_OQ);
  slot = _mm512_mask_add_epi32(slot, beyond, slot, _mm512_set1_epi32(1));
  const __m512 f = _mm512_fmadd_ps(x, _mm512_permutex2var_ps(t.slope[0], slot, t.slope[1]),
                                   _mm512_permutex2var_ps(t.offset[0], slot, t.offset[1]));
  // f in fixed point, 13 fractional bits: refer the lanes whose fraction is 0x1FFF, 0, 1 or 2
  const __m512i q = _mm512_castps_si512(_mm512_add_ps(f, _mm512_set1_ps(SegmentEncoder::kFixed)));
  refer = _mm512_testn_epi32_mask(_mm512_add_epi32(q, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x1FFC));
  // clamped at the segment's far end (max on the negative side, min on the positive);
  // the code is the low byte (kFixedCode's is 0)
  const __m512i code = _mm512_srli_epi32(q, 13), limit = _mm512_permutex2var_epi32(t.limit[0], slot, t.limit[1]);
  return _mm512_mask_max_epi32(_mm512_min_epi32(code, limit), negative, code, limit);
}

// The codes of NS states of one block (n <= kBlockSize), as kernels.cpp's encode_block
// gives them: x * (1 / absmax), or x / absmax when the reciprocal of a subnormal absmax
// is not finite. Where every map fits the segment encoder, the states are encoded in one
// pass, 16 lanes of each at a time (the lanes it refers are re-encoded by encode_fast
// after the pass, from the same scaled value); else state by state through the table
// (encode_lanes).
template <int NS>
void encode_states(const float* const* x, int64_t n, const float* absmax, const FastCodebook* const* books,
                   uint8_t* const* codes) {
  float inv[NS > 0 ? NS : 1];
  bool divide[NS > 0 ? NS : 1];
  __m512 scale[NS > 0 ? NS : 1];
  bool segments = true;
  for (int s = 0; s < NS; ++s) {
    inv[s] = inverse_absmax(absmax[s]);
    divide[s] = !finite_bits(inv[s]);
    scale[s] = _mm512_set1_ps(divide[s] ? absmax[s] : inv[s]);
    segments &= books[s]->segments.ok;
  }
  auto scaled = [&](int s, int64_t i, __mmask16 m) {
    const __m512 v = _mm512_maskz_loadu_ps(m, x[s] + i);
    return divide[s] ? _mm512_div_ps(v, scale[s]) : _mm512_mul_ps(v, scale[s]);
  };
  auto store = [&](int s, int64_t i, __mmask16 m, __m512i code) {
    // narrowed in a register, then stored (the masked narrowing store is slow on some CPUs)
    const __m128i bytes = _mm512_cvtepi32_epi8(code);
    if (m == 0xFFFF) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes[s] + i), bytes);
    } else {
      _mm_mask_storeu_epi8(codes[s] + i, m, bytes);
    }
  };
  if (!segments) {
    for (int s = 0; s < NS; ++s) {
      for (int64_t i = 0; i < n; i += kLanes) store(s, i, lanes(n - i), encode_lanes(*books[s], scaled(s, i, lanes(n - i))));
    }
    return;
  }
  SegmentLanes table[NS > 0 ? NS : 1];
  for (int s = 0; s < NS; ++s) table[s] = SegmentLanes(books[s]->segments);
  __mmask16 referred[NS > 0 ? NS : 1][kBlockSize / kLanes];
  __mmask16 any = 0;
  for (int64_t i = 0; i < n; i += kLanes) {
    const __mmask16 m = lanes(n - i);
    for (int s = 0; s < NS; ++s) {
      __mmask16 refer;
      store(s, i, m, encode_segment_lanes(table[s], scaled(s, i, m), refer));
      referred[s][i / kLanes] = refer & m;
      any |= refer & m;
    }
  }
  if (any == 0) return;  // rare: values next to a threshold
  for (int s = 0; s < NS; ++s) {
    for (int64_t i = 0; i < n; ++i) {
      if ((referred[s][i / kLanes] >> (i % kLanes)) & 1)
        codes[s][i] = encode_fast(*books[s], divide[s] ? x[s][i] / absmax[s] : x[s][i] * inv[s]);
    }
  }
}

// kernels.cpp's row_sumsq lanes for one row: element i still goes to lane i % 8, in
// order (16 elements are two 8-lane steps), and masked or non-finite lanes add +0.0,
// which leaves a non-negative sum unchanged: the same bits as the scalar loop.
template <typename P>
void row_sumsq_lanes(const P* row, int64_t row_length, double* lane) {
  __m512d acc = _mm512_setzero_pd();
  for (int64_t i = 0; i < row_length; i += kLanes) {
    const __mmask16 m = lanes(row_length - i);
    const __m512 raw = load(row + i, m);
    const __m512 x = _mm512_maskz_mov_ps(m & ~nonfinite(raw, m), raw);
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    acc = _mm512_add_pd(acc, _mm512_mul_pd(lo, lo));
    acc = _mm512_add_pd(acc, _mm512_mul_pd(hi, hi));
  }
  _mm512_storeu_pd(lane, acc);
}

}  // namespace distopt::cpu::avx512

#endif  // DISTOPT_CPU_AVX512
