// CUDA unified (managed) memory for paged optimizer state (distopt/paging.py):
// - managed_empty: cudaMallocManaged, as a tensor on cuda:<device> whose storage frees
//   the memory with cudaFree when it dies (the tensor owns its buffer);
// - managed_prefetch_: cudaMemPrefetchAsync of a tensor's bytes to a GPU (device >= 0)
//   or to the host (-1), on the current stream of the tensor's device, where the devices
//   support it (concurrentManagedAccess; elsewhere a no-op: pages migrate on access).
//   CUDA 13 takes a cudaMemLocation and flags where CUDA 12 took a device ordinal
//   (CUDART_VERSION).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

namespace distopt::cuda {
namespace {

at::Tensor managed_empty_op(at::IntArrayRef size, at::ScalarType dtype, int64_t device) {
  TORCH_CHECK(device >= 0, "distopt: managed_empty needs a CUDA device index, got ", device);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  int64_t numel = 1;
  for (int64_t d : size) {
    TORCH_CHECK(d >= 0, "distopt: managed_empty: negative dimension ", d);
    numel *= d;
  }
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  void* ptr = nullptr;
  C10_CUDA_CHECK(cudaMallocManaged(&ptr, bytes > 0 ? bytes : 1, cudaMemAttachGlobal));
  const c10::Device where(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
  try {
    return at::from_blob(
        ptr, size, [](void* p) { C10_CUDA_CHECK_WARN(cudaFree(p)); }, at::TensorOptions().dtype(dtype).device(where),
        where);
  } catch (...) {  // the tensor never took ownership
    C10_CUDA_CHECK_WARN(cudaFree(ptr));
    throw;
  }
}

// Whether `device` can prefetch managed memory (cudaMemPrefetchAsync needs
// concurrentManagedAccess on the stream's device; it is 0 on Windows/WDDM, WSL and some
// virtual GPUs, where the memory is still usable and migrates on access).
bool can_prefetch(int device) {
  int concurrent = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, device));
  return concurrent != 0;
}

void managed_prefetch_op(at::Tensor t, int64_t device) {
  TORCH_CHECK(t.is_cuda(), "distopt: managed_prefetch_ takes a CUDA (managed) tensor");
  TORCH_CHECK(device >= -1, "distopt: managed_prefetch_: device is a GPU index or -1 for the host");
  if (t.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(t.device());
  if (!can_prefetch(t.device().index()) || (device >= 0 && !can_prefetch(static_cast<int>(device)))) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const void* ptr = static_cast<const char*>(t.storage().data()) + t.storage_offset() * t.element_size();
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  TORCH_CHECK(t.is_contiguous(), "distopt: managed_prefetch_ takes a contiguous tensor");
#if CUDART_VERSION >= 13000
  cudaMemLocation location{};
  location.type = device >= 0 ? cudaMemLocationTypeDevice : cudaMemLocationTypeHost;
  location.id = device >= 0 ? static_cast<int>(device) : 0;
  C10_CUDA_CHECK(cudaMemPrefetchAsync(ptr, bytes, location, 0, stream));
#else
  C10_CUDA_CHECK(cudaMemPrefetchAsync(ptr, bytes, device >= 0 ? static_cast<int>(device) : cudaCpuDeviceId, stream));
#endif
}

}  // namespace

// No tensor argument to dispatch on: CompositeExplicitAutograd serves every backend key.
TORCH_LIBRARY_IMPL(distopt, CompositeExplicitAutograd, m) { m.impl("managed_empty", &managed_empty_op); }

TORCH_LIBRARY_IMPL(distopt, CUDA, m) { m.impl("managed_prefetch_", &managed_prefetch_op); }

}  // namespace distopt::cuda
