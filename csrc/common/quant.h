// Block-wise dynamic quantization, as in distopt/quant.py (the reference):
// absmax = max |x| over a block of BLOCK_SIZE elements of one dim-0 row; an element is
// stored as the index of the nearest map value to x * (1 / absmax), found exactly by
// comparing with 255 fp32 thresholds (halfway between two map values: the lower code);
// a block whose absmax is 0 stores the code of exact 0. For maps that start at 0 (the
// unsigned map of second moments) a positive value takes at least code 1, so a second
// moment never decodes to 0 while its first moment does not (see distopt/quant.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace distopt {

constexpr int64_t kBlockSize = 256;

// The map (decode table) and its decision thresholds (encode table).
struct Codebook {
  float value[256];
  float threshold[255];
};

// The smallest fp32 value strictly nearer to b than to a (a < b), exactly: the
// midpoint of two floats is exact in double.
DISTOPT_HD float upper_threshold(float a, float b) {
  const double mid = (static_cast<double>(a) + static_cast<double>(b)) * 0.5;
  float t = static_cast<float>(mid);
  if (static_cast<double>(t) <= mid) t = nextafterf(t, INFINITY);
  const float below = nextafterf(t, -INFINITY);
  return static_cast<double>(below) > mid ? below : t;
}

DISTOPT_HD void make_codebook(const float* qmap, Codebook& book) {
  for (int i = 0; i < 256; ++i) book.value[i] = qmap[i];
  for (int i = 0; i < 255; ++i) book.threshold[i] = upper_threshold(qmap[i], qmap[i + 1]);
}

// The number of thresholds at or below x (the nearest code): a branch-free binary search.
DISTOPT_HD uint8_t encode(const float* threshold, float x) {
  int lo = 0;
  for (int step = 128; step >= 1; step >>= 1) lo += (threshold[lo + step - 1] <= x) ? step : 0;
  return static_cast<uint8_t>(lo);
}

// Finite test on the bits (exponent not all ones), immune to finite-math assumptions.
DISTOPT_HD bool finite_bits(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7f800000u) != 0x7f800000u;
}

DISTOPT_HD float inverse_absmax(float absmax) { return absmax > 0.0f ? 1.0f / absmax : 0.0f; }

DISTOPT_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace distopt
