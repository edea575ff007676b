// The CUDA launchers of distopt's fused updates: raw pointers, int64_t sizes and the
// stream to launch on (always the caller's current stream; nothing here synchronizes).
// Each launcher checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK). The tensor boundary
// (checks, dtype dispatch, device guard, stream) is csrc/cuda/cuda_ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "blockwise8bit.h"
#include "multi_tensor.h"
#include "rowwise.h"

namespace distopt::cuda {

// Block-wise 8-bit AdamW / SGD (a.max_out set: the first pass of block_wise=false).
// For block_wise=false updates the launcher also stores new_absmax as each state's absmax.
template <typename P>
void launch_adamw8bit(const Block8bitArgs<P>& a, const AdamWCoeffs& c, cudaStream_t stream);
template <typename P>
void launch_sgd8bit(const Block8bitArgs<P>& a, const SGDCoeffs& c, cudaStream_t stream);

// 32-bit updates of many parameters (numel > 0 each), few launches.
template <typename P>
void launch_adamw32(const Tensor32<P, AdamWCoeffs>* tensors, int64_t count, int nstates, cudaStream_t stream);
template <typename P>
void launch_sgd32(const Tensor32<P, SGDCoeffs>* tensors, int64_t count, int nstates, cudaStream_t stream);

template <typename P>
void launch_row_sumsq(const RowSumsqArgs<P>& a, cudaStream_t stream);

// block_wise=false: a.absmax[0] must be zero on entry; it receives the tensor's absmax.
void launch_quantize(const QuantizeArgs& a, cudaStream_t stream);
void launch_dequantize(const DequantizeArgs& a, cudaStream_t stream);

}  // namespace distopt::cuda
