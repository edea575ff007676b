// Host-side helpers shared by the tensor boundaries of every backend (csrc/cpu/ops.cpp,
// csrc/cuda/boundary.h) and the host build of the CUDA kernels (csrc/cuda/host_harness.cpp):
// how a parameter is seen as dim-0 rows, the dtype dispatch, the *_multi_ ops' lists.
// Never seen by a kernel.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

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

// The *_multi_ ops' lists (csrc/registration.cpp): `required` lists need one tensor per
// parameter, `optional` ones too or none (no such state); `coeffs` holds
// `coeffs_per_tensor` values per parameter; the parameters share one device and dtype.
inline void check_lists(const at::TensorList& params, const std::vector<at::TensorList>& required,
                        const std::vector<at::TensorList>& optional, size_t ncoeffs, size_t coeffs_per_tensor) {
  for (const auto& l : required)
    TORCH_CHECK(l.size() == params.size(), "distopt: every tensor list needs one entry per parameter");
  for (const auto& l : optional)
    TORCH_CHECK(l.empty() || l.size() == params.size(), "distopt: a state list needs one entry per parameter or none");
  TORCH_CHECK(ncoeffs == coeffs_per_tensor * params.size(), "distopt: coeffs needs ", coeffs_per_tensor,
              " values per parameter");
  for (const auto& p : params) {
    TORCH_CHECK(p.device() == params[0].device() && p.scalar_type() == params[0].scalar_type(),
                "distopt: the parameters of one multi-tensor update share one device and dtype");
  }
}

// The states of parameter j from lists of per-parameter tensors (empty lists: none).
inline std::vector<at::Tensor> states_of(const std::vector<at::TensorList>& lists, size_t j) {
  std::vector<at::Tensor> out;
  for (const auto& l : lists)
    if (!l.empty()) out.push_back(l[j]);
  return out;
}

}  // namespace distopt
