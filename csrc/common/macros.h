// Host/device qualifiers so one header serves the CPU kernels and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define DISTOPT_HD __host__ __device__ __forceinline__
#else
#define DISTOPT_HD inline
#endif
