// Portability macros for code shared by the CPU (g++) and CUDA (nvcc) kernels.
#pragma once

#if defined(__CUDACC__)
#define FASTOPT_HOST_DEVICE __host__ __device__
#define FASTOPT_INLINE __forceinline__
#else
#define FASTOPT_HOST_DEVICE
#define FASTOPT_INLINE inline __attribute__((always_inline))
#endif
