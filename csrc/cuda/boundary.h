// Shared by the CUDA boundary files (cuda_ops.cpp, cuda_ops32.cpp): tensor checks, dtype dispatch
// and the current stream. Everything here runs on the host, before a launch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common/host_tensor.h"
#include "kernels.h"

namespace distopt::cuda {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;


inline void check_on(const Tensor& t, const Tensor& param, const char* name) {
  TORCH_CHECK(t.device() == param.device(), "distopt: ", name, " is on ", t.device(), ", the parameter on ",
              param.device());
}

inline void check_pair(const Tensor& param, const Tensor& grad) {
  TORCH_CHECK(param.is_cuda(), "distopt: the CUDA kernels take CUDA tensors");
  check_on(grad, param, "grad");
  TORCH_CHECK(param.is_contiguous() && grad.is_contiguous(), "distopt: param and grad must be contiguous");
  TORCH_CHECK(param.sizes() == grad.sizes(), "distopt: grad shape ", grad.sizes(), " != param shape ", param.sizes());
  TORCH_CHECK(param.scalar_type() == grad.scalar_type(), "distopt: grad dtype ", grad.scalar_type(),
              " != param dtype ", param.scalar_type());
}

inline const float* scale_of(const Tensor& t, const Tensor& param) {
  check_on(t, param, "gnorm_scale");
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat, "distopt: gnorm_scale must be one fp32 value");
  return t.data_ptr<float>();
}

inline int64_t* count_of(const Tensor& t, const Tensor& param) {
  check_on(t, param, "nonfinite_count");
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kLong, "distopt: nonfinite_count must be one int64 value");
  return t.data_ptr<int64_t>();
}

inline void check_state32(const Tensor& param, const Tensor& state) {
  check_on(state, param, "a 32-bit state");
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.sizes() == param.sizes(),
              "distopt: 32-bit states must be contiguous fp32 tensors shaped like the parameter");
}

struct Quant {
  Tensor codes, absmax, qmap;
};

inline void check_quant(const Tensor& param, const Quant& q) {
  check_on(q.codes, param, "codes");
  check_on(q.absmax, param, "absmax");
  check_on(q.qmap, param, "qmap");
  TORCH_CHECK(q.codes.scalar_type() == at::kByte && q.codes.is_contiguous() && q.codes.sizes() == param.sizes(),
              "distopt: 8-bit states must be contiguous uint8 codes shaped like the parameter");
  const int64_t blocks = blocks_of(rows_of(param), row_length_of(param));
  TORCH_CHECK(q.absmax.scalar_type() == at::kFloat && q.absmax.is_contiguous() &&
                  (q.absmax.numel() == blocks || q.absmax.numel() == 1),
              "distopt: absmax must be contiguous fp32 with one value per block or one in all");
  TORCH_CHECK(q.qmap.scalar_type() == at::kFloat && q.qmap.is_contiguous() && q.qmap.numel() == 256,
              "distopt: qmap must be 256 contiguous fp32 values");
}

inline cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

}  // namespace distopt::cuda
