// CUDA kernels: thin __global__ wrappers around the kernel bodies (blockwise8bit.h,
// multi_tensor.h, rowwise.h) run with DeviceExec, and their launchers.
//
// Built with --fmad=false (distopt/_build.py): no multiply-add is contracted, and with
// IEEE division and square root (nvcc's defaults) each element takes the operations
// the CPU kernels take. Grids are persistent (a few blocks per SM, grid-stride loops),
// launched on the given stream; no launcher synchronizes. Arguments are __grid_constant__:
// the bodies index their arrays (a launch's tensor table) without a per-thread copy.
#include "kernels.h"

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

namespace distopt::cuda {
namespace {

constexpr int kBlocksPerSM = 8;  // 256 threads and ~13 KB of shared memory per block

int64_t grid_for(int64_t work) {
  static int sms[64] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int& count = sms[device % 64];
  if (count == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return std::max<int64_t>(1, std::min<int64_t>(work, int64_t(count) * kBlocksPerSM));
}

template <int NS, typename P, typename Rule>
__global__ void __launch_bounds__(kThreads)
    blockwise8bit_kernel(const __grid_constant__ Block8bitArgs<P> a, const Rule rule) {
  __shared__ Block8bitShared sh;
  blockwise8bit_body<NS>(DeviceExec{}, a, rule, sh);
}

template <typename P, typename Rule>
void launch_8bit(const Block8bitArgs<P>& a, const Rule& rule, cudaStream_t stream) {
  const int64_t nblocks = blocks_of(a.rows, a.row_length);
  if (nblocks == 0) return;
  const dim3 grid(static_cast<unsigned>(grid_for(nblocks)));
  switch (a.nstates) {
    case 1: blockwise8bit_kernel<1><<<grid, kThreads, 0, stream>>>(a, rule); break;
    case 2: blockwise8bit_kernel<2><<<grid, kThreads, 0, stream>>>(a, rule); break;
    default: blockwise8bit_kernel<3><<<grid, kThreads, 0, stream>>>(a, rule); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!a.block_wise && a.max_out == nullptr) {  // the states' absmax, once every block has read it
    for (int s = 0; s < a.nstates; ++s)
      C10_CUDA_CHECK(cudaMemcpyAsync(a.absmax[s], a.new_absmax + s, sizeof(float), cudaMemcpyDeviceToDevice, stream));
  }
}

template <int NS, typename P, typename C>
__global__ void __launch_bounds__(kThreads) multi32_kernel(const __grid_constant__ Multi32bitArgs<P, C> a) {
  multi32_body<NS>(DeviceExec{}, a);
}

template <int NS, typename P, typename C>
void launch_multi(const Tensor32<P, C>* tensors, int64_t count, cudaStream_t stream) {
  static_assert(sizeof(Multi32bitArgs<P, C>) <= 4000, "kernel parameters are limited to 4 KB");
  pack_launches(tensors, count, NS, [&](const Multi32bitArgs<P, C>& a) {
    multi32_kernel<NS><<<a.nblocks, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename P>
__global__ void __launch_bounds__(kThreads) row_sumsq_kernel(RowSumsqArgs<P> a) {
  __shared__ RowSumsqShared sh;
  row_sumsq_body(DeviceExec{}, a, sh);
}

__global__ void __launch_bounds__(kThreads) quantize_kernel(QuantizeArgs a) {
  __shared__ QuantizeShared sh;
  quantize_body(DeviceExec{}, a, sh);
}

__global__ void __launch_bounds__(kThreads) dequantize_kernel(DequantizeArgs a) { dequantize_body(DeviceExec{}, a); }

}  // namespace

template <typename P>
void launch_adamw8bit(const Block8bitArgs<P>& a, const AdamWCoeffs& c, cudaStream_t stream) {
  launch_8bit(a, AdamWRule{c, a.nstates == 3}, stream);
}

template <typename P>
void launch_sgd8bit(const Block8bitArgs<P>& a, const SGDCoeffs& c, cudaStream_t stream) {
  launch_8bit(a, SGDRule{c, true}, stream);
}

template <typename P>
void launch_adamw32(const Tensor32<P, AdamWCoeffs>* tensors, int64_t count, int nstates, cudaStream_t stream) {
  if (nstates == 3) return launch_multi<3>(tensors, count, stream);
  launch_multi<2>(tensors, count, stream);
}

template <typename P>
void launch_sgd32(const Tensor32<P, SGDCoeffs>* tensors, int64_t count, int nstates, cudaStream_t stream) {
  if (nstates == 1) return launch_multi<1>(tensors, count, stream);
  launch_multi<0>(tensors, count, stream);
}

template <typename P>
void launch_row_sumsq(const RowSumsqArgs<P>& a, cudaStream_t stream) {
  if (a.rows == 0) return;
  row_sumsq_kernel<<<static_cast<unsigned>(grid_for(a.rows)), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_quantize(const QuantizeArgs& a, cudaStream_t stream) {
  const int64_t nblocks = blocks_of(a.rows, a.row_length);
  if (nblocks == 0) return;
  const dim3 grid(static_cast<unsigned>(grid_for(nblocks)));
  if (!a.block_wise) {
    QuantizeArgs first = a;
    first.max_out = a.absmax;
    quantize_kernel<<<grid, kThreads, 0, stream>>>(first);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  quantize_kernel<<<grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_dequantize(const DequantizeArgs& a, cudaStream_t stream) {
  const int64_t numel = a.rows * a.row_length;
  if (numel == 0) return;
  dequantize_kernel<<<static_cast<unsigned>(grid_for(ceil_div(numel, kThreads))), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define DISTOPT_INSTANTIATE(P)                                                                                 \
  template void launch_adamw8bit<P>(const Block8bitArgs<P>&, const AdamWCoeffs&, cudaStream_t);                \
  template void launch_sgd8bit<P>(const Block8bitArgs<P>&, const SGDCoeffs&, cudaStream_t);                    \
  template void launch_adamw32<P>(const Tensor32<P, AdamWCoeffs>*, int64_t, int, cudaStream_t);                \
  template void launch_sgd32<P>(const Tensor32<P, SGDCoeffs>*, int64_t, int, cudaStream_t);                    \
  template void launch_row_sumsq<P>(const RowSumsqArgs<P>&, cudaStream_t);

DISTOPT_INSTANTIATE(float)
DISTOPT_INSTANTIATE(c10::BFloat16)
DISTOPT_INSTANTIATE(c10::Half)

}  // namespace distopt::cuda
