// How a kernel body runs: on the device (one thread per call, __syncthreads() between
// phases) or on the host (every thread of the block in turn, phase by phase).
//
// A kernel body (blockwise8bit.h, multi_tensor.h, rowwise.h) is a template over an
// Exec. Between two barriers it calls `x.threads(f)` with a per-thread phase `f(t)`;
// per-thread values that outlive a phase live in `Exec::Local<T>`, indexed by the
// thread (one register on the device, one slot per thread on the host). The host
// build runs the very code the GPU runs, so the CPU test suite checks its indexing,
// tails, boundary blocks and block reductions (DESIGN §7).
#pragma once

#include <cstdint>

#include "../common/macros.h"

namespace distopt::cuda {

constexpr int kThreads = 256;  // threads per CUDA block; one 8-bit quantization block per pass

#if defined(__CUDACC__)
#define DISTOPT_BODY __device__ __forceinline__

struct DeviceExec {
  template <typename T>
  struct Local {
    T value;
    __device__ T& operator[](int) { return value; }
  };
  template <typename F>
  __device__ void threads(F&& f) const {
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
  }
  __device__ int64_t cta() const { return blockIdx.x; }
  __device__ int64_t grid() const { return gridDim.x; }
  __device__ static void add_count(int64_t* count, int64_t n) {
    atomicAdd(reinterpret_cast<unsigned long long*>(count), static_cast<unsigned long long>(n));
  }
  // For non-negative floats (absolute values) the int order is the float order: exact and
  // independent of the order the blocks finish in.
  __device__ static void max_nonnegative(float* at, float v) {
    atomicMax(reinterpret_cast<int*>(at), __float_as_int(v));
  }
};
#else
#define DISTOPT_BODY inline
#endif

// The host stand-in for one CUDA block `cta` of a grid of `grid` blocks.
struct HostExec {
  int64_t cta_index;
  int64_t grid_size;

  template <typename T>
  struct Local {
    T value[kThreads];
    T& operator[](int t) { return value[t]; }
  };
  template <typename F>
  void threads(F&& f) const {
    for (int t = 0; t < kThreads; ++t) f(t);
  }
  int64_t cta() const { return cta_index; }
  int64_t grid() const { return grid_size; }
  static void add_count(int64_t* count, int64_t n) { *count += n; }
  static void max_nonnegative(float* at, float v) { *at = v > *at ? v : *at; }
};

}  // namespace distopt::cuda
