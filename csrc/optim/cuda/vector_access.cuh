// Vector loads and stores of N consecutive elements, in accesses of up to 16 bytes (one
// instruction moves 4 floats, 8 bf16/fp16 values or 2 doubles); N elements of a wider type take
// several accesses, of a narrower type one smaller access.
#pragma once

#include <cstdint>

#include "optim/cuda/launch.cuh"

namespace fastopt::cuda {

constexpr int kVectorBytes = 16;

// The bytes of one access when moving N elements of type T.
template <int N, typename T>
constexpr int access_bytes() {
  return N * int(sizeof(T)) < kVectorBytes ? N * int(sizeof(T)) : kVectorBytes;
}

template <typename T, int BYTES>
struct alignas(BYTES) Access {
  T values[BYTES / sizeof(T)];
};

template <int N, typename T>
__device__ __forceinline__ bool is_vector_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % access_bytes<N, T>() == 0;
}

template <int N, typename T>
__device__ __forceinline__ void load_vector(const T* src, T (&dst)[N]) {
  constexpr int kBytes = access_bytes<N, T>();
  constexpr int kPerAccess = kBytes / int(sizeof(T));
#pragma unroll
  for (int a = 0; a < N / kPerAccess; ++a) {
    check_vector_access(src + a * kPerAccess, kBytes);
    const Access<T, kBytes> v = *reinterpret_cast<const Access<T, kBytes>*>(src + a * kPerAccess);
#pragma unroll
    for (int j = 0; j < kPerAccess; ++j) dst[a * kPerAccess + j] = v.values[j];
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_vector(T* dst, const T (&src)[N]) {
  constexpr int kBytes = access_bytes<N, T>();
  constexpr int kPerAccess = kBytes / int(sizeof(T));
#pragma unroll
  for (int a = 0; a < N / kPerAccess; ++a) {
    check_vector_access(dst + a * kPerAccess, kBytes);
    Access<T, kBytes> v;
#pragma unroll
    for (int j = 0; j < kPerAccess; ++j) v.values[j] = src[a * kPerAccess + j];
    *reinterpret_cast<Access<T, kBytes>*>(dst + a * kPerAccess) = v;
  }
}

}  // namespace fastopt::cuda
