// Portability macros for code shared by the CPU (g++) and CUDA (nvcc) kernels.
#pragma once

#if defined(__CUDACC__)
#define FASTOPT_HOST_DEVICE __host__ __device__
#define FASTOPT_INLINE __forceinline__
#else
#define FASTOPT_HOST_DEVICE
#define FASTOPT_INLINE inline __attribute__((always_inline))
#endif

// Placed after a lambda's parameter list: the lambda is always inlined into its caller, so it is
// compiled for the caller's instruction set (see cpu/isa.h).
#define FASTOPT_INLINE_LAMBDA __attribute__((always_inline))
