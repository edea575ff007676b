// Conversions between fp32 and a parameter's dtype (float, c10::BFloat16, c10::Half)
// that give the same bits in every build: kernels.cpp's scalar loops and the vector
// helpers (simd_avx2.h, simd_avx512.h) all round through these.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

namespace distopt::cpu {

// fp32 to the parameter dtype: c10's conversion, except that an fp16 NaN is always
// 0x7E00 with its sign. c10's software conversion (the DEFAULT build) makes it so; with
// F16C (the AVX2 and AVX-512 builds) c10 converts in hardware, which keeps the payload.
template <typename P>
inline P to_param(float x) {
  return static_cast<P>(x);
}
template <>
inline c10::Half to_param<c10::Half>(float x) {
  if (x != x) return c10::Half(static_cast<uint16_t>(std::signbit(x) ? 0xFE00u : 0x7E00u), c10::Half::from_bits());
  return static_cast<c10::Half>(x);
}

}  // namespace distopt::cpu
