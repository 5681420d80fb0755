// 16-byte vector loads and stores between memory of storage type S and registers of compute
// type C: one instruction moves 4 floats, 8 bf16/fp16 values or 2 doubles.
#pragma once

#include <cstdint>

#include "optim/cuda/launch.cuh"

namespace fastopt::cuda {

constexpr int kVectorBytes = 16;

template <typename S>
struct alignas(kVectorBytes) VectorOf {
  S values[kVectorBytes / sizeof(S)];
};

template <typename T>
__device__ __forceinline__ bool is_vector_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0;
}

template <typename S, typename C>
__device__ __forceinline__ void load_vector(const S* src, C* dst) {
  check_vector_access(src);
  const VectorOf<S> v = *reinterpret_cast<const VectorOf<S>*>(src);
#pragma unroll
  for (int j = 0; j < kVectorBytes / int(sizeof(S)); ++j) dst[j] = C(v.values[j]);
}

template <typename S, typename C>
__device__ __forceinline__ void store_vector(S* dst, const C* src) {
  check_vector_access(dst);
  VectorOf<S> v;
#pragma unroll
  for (int j = 0; j < kVectorBytes / int(sizeof(S)); ++j) v.values[j] = S(src[j]);
  *reinterpret_cast<VectorOf<S>*>(dst) = v;
}

}  // namespace fastopt::cuda
