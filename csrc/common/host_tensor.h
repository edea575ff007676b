// Host-side helpers shared by the tensor boundaries of every backend (csrc/cpu/ops.cpp,
// csrc/cuda/boundary.h) and the host build of the CUDA kernels (csrc/cuda/host_harness.cpp):
// how a parameter is seen as dim-0 rows, and the dtype dispatch. Never seen by a kernel.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace distopt {

// A tensor as `rows_of` dim-0 rows of `row_length_of` elements (a 0-d tensor: one of one).
inline int64_t rows_of(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.size(0); }
inline int64_t row_length_of(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

// Calls f with a value of the parameter's C++ type: float, c10::BFloat16 or c10::Half.
template <typename F>
void dispatch_dtype(const at::Tensor& param, const char* op, F&& f) {
  switch (param.scalar_type()) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "distopt::", op, ": unsupported dtype ", param.scalar_type(),
                         " (float32, bfloat16 and float16 are supported)");
  }
}

}  // namespace distopt
