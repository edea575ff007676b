// CPU kernels of distopt's fused updates: raw pointers and int64_t sizes only.
// The tensor boundary (checks, dtype dispatch) is csrc/cpu/ops.cpp.
#pragma once

#include <cstdint>

#include "../common/optim_math.h"
#include "../common/quant.h"

namespace distopt::cpu {

// One 8-bit state: uint8 codes shaped like the parameter, fp32 absmax
// ([rows, ceil(row_length / 256)] block-wise, [1] otherwise) and its map.
struct QuantState {
  uint8_t* codes;
  float* absmax;
  const float* qmap;
};

// A parameter seen as `rows` dim-0 rows of `row_length` elements, 8-bit states.
template <typename P>
struct Blocked8bit {
  P* param;
  const P* grad;
  int64_t rows;
  int64_t row_length;
  bool block_wise;
  int nstates;
  QuantState state[3];
  // block_wise=false: the new per-state absmax to quantize with (from *_new_absmax).
  const float* new_absmax;
  float gnorm_scale;
  int64_t* nonfinite_count;
};

// A parameter with fp32 states, elementwise.
template <typename P>
struct Elementwise32bit {
  P* param;
  const P* grad;
  int64_t numel;
  int nstates;
  float* state[3];
  float gnorm_scale;
  int64_t* nonfinite_count;
};

// The updates of n parameters a[0..n), each with its own coefficients c[j]: the blocks
// (8-bit) or elements (32-bit) of all of them are shared among the threads, so many
// small parameters keep every thread busy. All 8-bit ones have the same states; so do
// the 32-bit ones.
template <typename P>
void adamw8bit(const Blocked8bit<P>* a, const AdamWCoeffs* c, int64_t n);
template <typename P>
void sgd8bit(const Blocked8bit<P>* a, const SGDCoeffs* c, int64_t n);
template <typename P>
void adamw32(const Elementwise32bit<P>* a, const AdamWCoeffs* c, int64_t n);
template <typename P>
void sgd32(const Elementwise32bit<P>* a, const SGDCoeffs* c, int64_t n);
// block_wise=false's first pass over one parameter: each state's new largest magnitude.
template <typename P>
void adamw8bit_new_absmax(const Blocked8bit<P>& a, const AdamWCoeffs& c, float* out);
template <typename P>
void sgd8bit_new_absmax(const Blocked8bit<P>& a, const SGDCoeffs& c, float* out);

// Sum of squares of the finite elements of each row, in float64 (no overflow for any
// finite fp32 gradient), in a fixed order.
template <typename P>
void row_sumsq(const P* grad, int64_t rows, int64_t row_length, double* out);

void quantize_blockwise(const float* x, int64_t rows, int64_t row_length, bool block_wise,
                        const float* qmap, uint8_t* codes, float* absmax);
void dequantize_blockwise(const uint8_t* codes, const float* absmax, int64_t rows,
                          int64_t row_length, bool block_wise, const float* qmap, float* out);

}  // namespace distopt::cpu
