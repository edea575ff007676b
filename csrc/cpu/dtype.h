// Conversions between fp32 and a parameter's dtype (float, c10::BFloat16, c10::Half)
// that give the same bits in every build: kernels.cpp's scalar loops and the vector
// helpers (simd_avx2.h, simd_avx512.h) all round through these.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace distopt::cpu {

// The parameter dtype to fp32 (exact).
template <typename P>
inline float from_param(P x) {
  return static_cast<float>(x);
}

// fp32 to the parameter dtype: c10's conversion, except for an fp16 NaN, which is
// always the NaN the F16C instruction makes of it: its sign, quieted, and the top 10
// bits of its payload (sign | 0x7E00 | mantissa >> 13). c10 converts in hardware in the
// AVX2 and AVX-512 builds (F16C) and in software in the DEFAULT build, which made every
// NaN 0x7E00 with its sign; torch's own fp32-to-fp16 conversion on x86, used by the
// reference path, gives the F16C NaN.
template <typename P>
inline P to_param(float x) {
  return static_cast<P>(x);
}
template <>
inline c10::Half to_param<c10::Half>(float x) {
  if (x != x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const uint32_t half = ((bits >> 16) & 0x8000u) | 0x7E00u | ((bits & 0x7FFFFFu) >> 13);
    return c10::Half(static_cast<uint16_t>(half), c10::Half::from_bits());
  }
  return static_cast<c10::Half>(x);
}

}  // namespace distopt::cpu
