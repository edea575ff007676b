// The block-wise 8-bit update as a kernel body: one CUDA block of 256 threads per
// quantization block (grid-stride over blocks), one element per thread, in three phases
// around a shared-memory tree reduction:
//   1. load, dequantize, update (optim_math.h), and each thread's |new state| and flag;
//   2. reduce: the block's new absmax per state, its old absmax, any non-finite element;
//   3. quantize with the exact nearest code (binary search over the 255 thresholds in
//      shared memory: the codes csrc/cpu's tables give) and store.
// Blocks never cross a dim-0 row (DESIGN §3.2): block b of row r starts at element
// r * row_length + j * 256. Non-finite rule (DESIGN §3.5): a block with a non-finite
// gradient or new state is left untouched (block-wise); with one absmax per tensor its
// parameters are untouched and its states keep their old values, re-encoded.
//
// With `max_out` the body is the first pass of block_wise=false: it writes nothing but
// each state's largest new magnitude (an exact, order-independent max).
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/optim_math.h"
#include "../common/quant.h"
#include "exec.h"

namespace distopt::cuda {

static_assert(kBlockSize == kThreads, "one thread per element of a quantization block");

// A parameter as `rows` dim-0 rows of `row_length` elements, with 1-3 8-bit states.
template <typename P>
struct Block8bitArgs {
  P* param;
  const P* grad;
  int64_t rows;
  int64_t row_length;
  bool block_wise;
  int nstates;
  uint8_t* codes[3];
  float* absmax[3];  // [rows * blocks_per_row] block-wise, [1] otherwise
  const float* qmap[3];
  const float* new_absmax;  // block_wise=false: one per state (from the first pass)
  float* max_out;           // the first pass of block_wise=false: zeroed, one per state
  const float* gnorm_scale;  // device scalar: no host synchronization to read it
  int64_t* nonfinite_count;
};

struct Block8bitShared {
  float value[3][256];
  float threshold[3][256];  // 255 used
  float new_max[3][kThreads];
  float old_max[3][kThreads];
  int bad[kThreads];
};

struct Element8bit {
  float p;
  float old[3];
  float e[3];
};

struct Span {
  int64_t start;
  int64_t length;
};

DISTOPT_HD int64_t blocks_of(int64_t rows, int64_t row_length) { return rows * ceil_div(row_length, kBlockSize); }

// Block b of a parameter with rows of `row_length`: its first element and its length.
DISTOPT_HD Span block_span(int64_t b, int64_t row_length) {
  const int64_t per_row = ceil_div(row_length, kBlockSize);
  const int64_t row = b / per_row, j = b % per_row;
  const int64_t rest = row_length - j * kBlockSize;
  return {row * row_length + j * kBlockSize, rest < kBlockSize ? rest : kBlockSize};
}

DISTOPT_HD void load_codebook(const float* qmap, float* value, float* threshold, int t) {
  value[t] = qmap[t];
  if (t < 255) threshold[t] = upper_threshold(qmap[t], qmap[t + 1]);
}

// The code of `v` in a block of `absmax` (as quant.py's _quantize_blocks and encode).
DISTOPT_HD uint8_t encode_value(const float* value, const float* threshold, float v, float absmax) {
  const float inv = inverse_absmax(absmax);
  const float x = finite_bits(inv) ? v * inv : v / absmax;  // a subnormal absmax: divide
  const uint8_t code = encode(threshold, x);
  return code == 0 && x > 0.0f && value[0] == 0.0f ? 1 : code;  // maps from 0: positives >= code 1
}

template <int NS, typename P, typename Rule>
DISTOPT_HD void update_element(const Block8bitArgs<P>& a, const Rule& rule, Block8bitShared& sh, int64_t b,
                               Span span, int t, Element8bit& el) {
  const bool valid = t < span.length;
  const int64_t i = span.start + t, ai = a.block_wise ? b : 0;
  float g = 0.0f, p = 0.0f;
  for (int s = 0; s < 3; ++s) el.old[s] = 0.0f;
  if (valid) {
    g = static_cast<float>(a.grad[i]);
    p = static_cast<float>(a.param[i]);
    for (int s = 0; s < NS; ++s) el.old[s] = sh.value[s][a.codes[s][i]] * a.absmax[s][ai];
  }
  float e[3] = {el.old[0], el.old[1], el.old[2]};
  rule(p, g * *a.gnorm_scale, e);  // discarded below when g is not finite
  bool finite = finite_bits(g);
  for (int s = 0; s < NS; ++s) finite = finite && finite_bits(e[s]);  // an overflowing state too
  el.p = p;
  for (int s = 0; s < 3; ++s) el.e[s] = e[s];
  sh.bad[t] = valid && !finite ? 1 : 0;
  for (int s = 0; s < NS; ++s) {
    sh.new_max[s][t] = valid && finite ? std::fabs(e[s]) : 0.0f;
    sh.old_max[s][t] = valid ? std::fabs(el.old[s]) : 0.0f;
  }
}

// One step of the tree reduction: thread t < width folds in thread t + width.
template <int NS>
DISTOPT_HD void reduce_step(Block8bitShared& sh, int t, int width) {
  if (t >= width) return;
  sh.bad[t] |= sh.bad[t + width];
  for (int s = 0; s < NS; ++s) {
    sh.new_max[s][t] = maximum(sh.new_max[s][t], sh.new_max[s][t + width]);
    sh.old_max[s][t] = maximum(sh.old_max[s][t], sh.old_max[s][t + width]);
  }
}

template <int NS, class Exec, typename P>
DISTOPT_BODY void store_element(const Exec& x, const Block8bitArgs<P>& a, const Block8bitShared& sh, int64_t b,
                              Span span, int t, const Element8bit& el) {
  const bool bad = sh.bad[0] != 0;
  if (a.max_out != nullptr) {  // first pass of block_wise=false: the values this block will hold
    if (t == 0)
      for (int s = 0; s < NS; ++s) x.max_nonnegative(&a.max_out[s], bad ? sh.old_max[s][0] : sh.new_max[s][0]);
    return;
  }
  if (bad && t == 0) x.add_count(a.nonfinite_count, span.length);
  if ((bad && a.block_wise) || t >= span.length) return;
  const int64_t i = span.start + t;
  for (int s = 0; s < NS; ++s) {
    const float absmax = a.block_wise ? sh.new_max[s][0] : a.new_absmax[s];
    a.codes[s][i] = encode_value(sh.value[s], sh.threshold[s], bad ? el.old[s] : el.e[s], absmax);
    if (a.block_wise && t == 0) a.absmax[s][b] = absmax;
  }
  if (!bad) a.param[i] = static_cast<P>(el.p);
}

// The whole body for one CUDA block (x.cta() of x.grid()).
template <int NS, class Exec, typename P, typename Rule>
DISTOPT_BODY void blockwise8bit_body(const Exec& x, const Block8bitArgs<P>& a, const Rule& rule, Block8bitShared& sh) {
  x.threads([&](int t) {
    for (int s = 0; s < NS; ++s) load_codebook(a.qmap[s], sh.value[s], sh.threshold[s], t);
  });
  typename Exec::template Local<Element8bit> el;
  const int64_t nblocks = blocks_of(a.rows, a.row_length);
  for (int64_t b = x.cta(); b < nblocks; b += x.grid()) {
    const Span span = block_span(b, a.row_length);
    x.threads([&](int t) { update_element<NS>(a, rule, sh, b, span, t, el[t]); });
    for (int width = kThreads / 2; width >= 1; width /= 2) x.threads([&](int t) { reduce_step<NS>(sh, t, width); });
    x.threads([&](int t) { store_element<NS>(x, a, sh, b, span, t, el[t]); });
  }
}

// The update rules of the 8-bit and 32-bit kernels (csrc/cpu/kernels.cpp has the same two).
struct AdamWRule {
  AdamWCoeffs c;
  bool amsgrad;
  DISTOPT_HD void operator()(float& p, float g, float* e) const {
    adamw_element(p, g, e[0], e[1], amsgrad ? &e[2] : nullptr, c);
  }
};

struct SGDRule {
  SGDCoeffs c;
  bool has_buffer;
  DISTOPT_HD void operator()(float& p, float g, float* e) const { sgd_element(p, g, has_buffer ? &e[0] : nullptr, c); }
};

}  // namespace distopt::cuda
