// Block-wise dynamic quantization, as in distopt/quant.py (the reference):
// absmax = max |x| over a block of BLOCK_SIZE elements of one dim-0 row; an element is
// stored as the index of the nearest map value to x * (1 / absmax), found by comparing
// with the 255 fp32 midpoints of adjacent map values (on a midpoint: the lower code);
// a block whose absmax is 0 stores the code of exact 0.
#pragma once

#include <cstdint>

#include "macros.h"

namespace distopt {

constexpr int64_t kBlockSize = 256;

// The map (decode table) and its decision boundaries (encode table).
struct Codebook {
  float value[256];
  float mid[255];
};

DISTOPT_HD void make_codebook(const float* qmap, Codebook& book) {
  for (int i = 0; i < 256; ++i) book.value[i] = qmap[i];
  for (int i = 0; i < 255; ++i) book.mid[i] = (qmap[i] + qmap[i + 1]) * 0.5f;
}

// The number of midpoints strictly below x: a branch-free binary search.
DISTOPT_HD uint8_t encode(const float* mid, float x) {
  int lo = 0;
  for (int step = 128; step >= 1; step >>= 1) lo += (mid[lo + step - 1] < x) ? step : 0;
  return static_cast<uint8_t>(lo);
}

DISTOPT_HD float inverse_absmax(float absmax) { return absmax > 0.0f ? 1.0f / absmax : 0.0f; }

DISTOPT_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace distopt
