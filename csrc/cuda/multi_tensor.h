// The fused 32-bit updates as a kernel body over many parameters per launch.
//
// A launch carries up to kMaxTensors parameters (pointers, sizes, coefficients, gnorm
// scale and skip counter each) and up to kMaxBlocks CUDA blocks, each updating one chunk
// of kChunk elements of one parameter: the table `block_tensor`/`block_chunk` says
// which (the layout of torch's multi_tensor_apply, in kernel parameters so that nothing
// is copied to the device). `pack_launches` cuts a parameter list into such launches.
// Elementwise non-finite rule (DESIGN §3.5): an element whose gradient or new state is
// not finite is left untouched and counted.
#pragma once

#include <cstdint>

#include "../common/optim_math.h"
#include "../common/quant.h"
#include "exec.h"

namespace distopt::cuda {

constexpr int kMaxTensors = 16;
constexpr int kMaxBlocks = 192;
constexpr int64_t kChunk = 16 * kThreads;

template <typename P, typename C>
struct Tensor32 {
  P* param;
  const P* grad;
  float* state[3];
  int64_t numel;
  const float* gnorm_scale;
  int64_t* nonfinite_count;
  C coeffs;
};

template <typename P, typename C>
struct Multi32bitArgs {
  int nstates;
  int ntensors;
  int nblocks;
  Tensor32<P, C> tensor[kMaxTensors];
  uint8_t block_tensor[kMaxBlocks];
  int64_t block_chunk[kMaxBlocks];
};

// The elements CUDA block `cta` updates: [start, end) of tensor `tensor`.
struct Chunk {
  int tensor;
  int64_t start;
  int64_t end;
};

template <typename P, typename C>
DISTOPT_HD Chunk chunk_of(const Multi32bitArgs<P, C>& a, int64_t cta) {
  const int j = a.block_tensor[cta];
  const int64_t start = a.block_chunk[cta] * kChunk, numel = a.tensor[j].numel;
  return {j, start, start + kChunk < numel ? start + kChunk : numel};
}

// The update rule by coefficient type: AdamW with 2 states (3 with amsgrad); SGD with
// 0 states (1 with momentum).
template <int NS>
DISTOPT_HD void apply32(float& p, float g, float* e, const AdamWCoeffs& c) {
  adamw_element(p, g, e[0], e[1], NS == 3 ? &e[2] : nullptr, c);
}
template <int NS>
DISTOPT_HD void apply32(float& p, float g, float* e, const SGDCoeffs& c) {
  sgd_element(p, g, NS == 1 ? &e[0] : nullptr, c);
}

// One element; false when it was skipped (a non-finite gradient or new state).
template <int NS, typename P, typename C>
DISTOPT_HD bool update32_element(const Tensor32<P, C>& x, int64_t i) {
  const float g = static_cast<float>(x.grad[i]);
  bool finite = finite_bits(g);
  float p = static_cast<float>(x.param[i]);
  float e[3] = {0.0f, 0.0f, 0.0f};
  for (int s = 0; s < NS; ++s) e[s] = x.state[s][i];
  const float scaled = finite ? g * *x.gnorm_scale : 0.0f;
  apply32<NS>(p, scaled, e, x.coeffs);
  for (int s = 0; s < NS; ++s) finite = finite && finite_bits(e[s]);
  if (!finite) return false;
  x.param[i] = static_cast<P>(p);
  for (int s = 0; s < NS; ++s) x.state[s][i] = e[s];
  return true;
}

template <int NS, class Exec, typename P, typename C>
DISTOPT_BODY void multi32_body(const Exec& x, const Multi32bitArgs<P, C>& a) {
  const Chunk c = chunk_of(a, x.cta());
  const Tensor32<P, C>& tensor = a.tensor[c.tensor];
  x.threads([&](int t) {
    int64_t skipped = 0;
    for (int64_t i = c.start + t; i < c.end; i += kThreads) skipped += update32_element<NS>(tensor, i) ? 0 : 1;
    if (skipped != 0) x.add_count(tensor.nonfinite_count, skipped);
  });
}

// Cuts `tensors` (numel > 0 each) into launches; calls launch(args) for each.
template <typename P, typename C, typename Launch>
void pack_launches(const Tensor32<P, C>* tensors, int64_t count, int nstates, Launch&& launch) {
  Multi32bitArgs<P, C> a{};
  a.nstates = nstates;
  for (int64_t j = 0; j < count; ++j) {
    if (a.ntensors == kMaxTensors) {
      launch(a);
      a.ntensors = a.nblocks = 0;
    }
    int slot = a.ntensors++;
    a.tensor[slot] = tensors[j];
    const int64_t chunks = ceil_div(tensors[j].numel, kChunk);
    for (int64_t k = 0; k < chunks; ++k) {
      if (a.nblocks == kMaxBlocks) {
        launch(a);
        a.nblocks = 0;
        a.tensor[0] = tensors[j];
        a.ntensors = 1;
        slot = 0;
      }
      a.block_tensor[a.nblocks] = static_cast<uint8_t>(slot);
      a.block_chunk[a.nblocks++] = k;
    }
  }
  if (a.nblocks > 0) launch(a);
}

}  // namespace distopt::cuda
