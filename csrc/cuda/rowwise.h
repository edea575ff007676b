// Kernel bodies of the statistics and standalone quantization ops:
// - row_sumsq: one CUDA block per dim-0 row (grid-stride over rows); thread t sums the
//   squares of the finite elements t, t+256, ... in float64 in that order, then a fixed
//   tree reduction. The order depends only on the row length, never on where the row
//   sits or on the grid, so every rank gets the same bits for the same row (DESIGN §3.1).
// - quantize_blockwise: absmax of each block by the same tree, then the exact encode
//   (block_wise=false: a first pass takes the tensor's max, order-independent);
// - dequantize_blockwise: elementwise, map[code] * absmax of the element's block.
#pragma once

#include <cmath>
#include <cstdint>

#include "blockwise8bit.h"
#include "exec.h"

namespace distopt::cuda {

template <typename P>
struct RowSumsqArgs {
  const P* grad;
  int64_t rows;
  int64_t row_length;
  double* out;
};

struct RowSumsqShared {
  double partial[kThreads];
};

template <class Exec, typename P>
DISTOPT_BODY void row_sumsq_body(const Exec& x, const RowSumsqArgs<P>& a, RowSumsqShared& sh) {
  for (int64_t r = x.cta(); r < a.rows; r += x.grid()) {
    const P* row = a.grad + r * a.row_length;
    x.threads([&](int t) {
      double sum = 0.0;
      for (int64_t i = t; i < a.row_length; i += kThreads) {
        const float v = static_cast<float>(row[i]);
        sum += finite_bits(v) ? static_cast<double>(v) * static_cast<double>(v) : 0.0;
      }
      sh.partial[t] = sum;
    });
    for (int width = kThreads / 2; width >= 1; width /= 2)
      x.threads([&](int t) {
        if (t < width) sh.partial[t] += sh.partial[t + width];
      });
    x.threads([&](int t) {
      if (t == 0) a.out[r] = sh.partial[0];
    });
  }
}

struct QuantizeArgs {
  const float* x;
  int64_t rows;
  int64_t row_length;
  bool block_wise;
  const float* qmap;
  uint8_t* codes;
  float* absmax;   // per block, or [1] holding the tensor's absmax (block_wise=false)
  float* max_out;  // the first pass of block_wise=false: zeroed; nothing else written
};

struct QuantizeShared {
  float value[256];
  float threshold[256];
  float max[kThreads];
};

template <class Exec>
DISTOPT_BODY void quantize_body(const Exec& x, const QuantizeArgs& a, QuantizeShared& sh) {
  x.threads([&](int t) { load_codebook(a.qmap, sh.value, sh.threshold, t); });
  const int64_t nblocks = blocks_of(a.rows, a.row_length);
  for (int64_t b = x.cta(); b < nblocks; b += x.grid()) {
    const Span span = block_span(b, a.row_length);
    x.threads([&](int t) { sh.max[t] = t < span.length ? std::fabs(a.x[span.start + t]) : 0.0f; });
    for (int width = kThreads / 2; width >= 1; width /= 2)
      x.threads([&](int t) {
        if (t < width) sh.max[t] = maximum(sh.max[t], sh.max[t + width]);
      });
    x.threads([&](int t) {
      if (a.max_out != nullptr) {
        if (t == 0) x.max_nonnegative(a.max_out, sh.max[0]);
        return;
      }
      const float absmax = a.block_wise ? sh.max[0] : a.absmax[0];
      if (t < span.length) a.codes[span.start + t] = encode_value(sh.value, sh.threshold, a.x[span.start + t], absmax);
      if (a.block_wise && t == 0) a.absmax[b] = absmax;
    });
  }
}

struct DequantizeArgs {
  const uint8_t* codes;
  const float* absmax;
  int64_t rows;
  int64_t row_length;
  bool block_wise;
  const float* qmap;
  float* out;
};

// The block of element i: its row's first block plus its position in the row / 256.
DISTOPT_HD int64_t block_of_element(int64_t i, int64_t row_length) {
  return (i / row_length) * ceil_div(row_length, kBlockSize) + (i % row_length) / kBlockSize;
}

DISTOPT_HD void dequantize_element(const DequantizeArgs& a, int64_t i) {
  a.out[i] = a.qmap[a.codes[i]] * a.absmax[a.block_wise ? block_of_element(i, a.row_length) : 0];
}

template <class Exec>
DISTOPT_BODY void dequantize_body(const Exec& x, const DequantizeArgs& a) {
  const int64_t numel = a.rows * a.row_length, stride = x.grid() * kThreads;
  x.threads([&](int t) {
    for (int64_t i = x.cta() * kThreads + t; i < numel; i += stride) dequantize_element(a, i);
  });
}

}  // namespace distopt::cuda
