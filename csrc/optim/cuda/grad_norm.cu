// fastopt::grad_norm on CUDA: the total norm of many tensors, of mixed dtypes, in three stages
// whose threads never communicate (so the emulation runs them exactly, see emulation.h):
//   1. one launch per up to kMaxBlocksPerLaunch chunks of kChunkSize elements, from any tensors:
//      each thread accumulates its strided share of its block's chunk into its own value;
//   2. kCombineThreads threads combine those values, thread k those at k, k + kCombineThreads...;
//   3. one thread combines the kCombineThreads results in order, takes the root, divides by
//      grad_scale (read on the device) and stores the norm.
// The order of every operation is fixed, so the result is deterministic; nothing is read back
// by the host, so the stages can be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "optim/cuda/launch.cuh"
#include "optim/cuda/multi_tensor_apply.cuh"
#include "optim/cuda/vector_access.cuh"
#include "optim/grad_norm.h"

namespace fastopt::cuda {
namespace {

constexpr int kCombineThreads = 2 * kBlockSize;

// The element types one launch may mix, one byte per tensor in the launch's parameters.
enum class ElementType : unsigned char { kFloat, kDouble, kHalf, kBFloat16 };

ElementType element_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return ElementType::kDouble;
    case at::kHalf:
      return ElementType::kHalf;
    case at::kBFloat16:
      return ElementType::kBFloat16;
    default:  // check_grad_norm admits only these four
      return ElementType::kFloat;
  }
}

// Kernel parameters of one stage-1 launch: the tensors, which chunk each block takes, and the
// index of the launch's first block among all blocks of the call (where its values go).
struct NormLaunch {
  const void* addresses[kMaxTensorsPerLaunch];
  int64_t numels[kMaxTensorsPerLaunch];
  ElementType types[kMaxTensorsPerLaunch];
  unsigned char block_to_tensor[kMaxBlocksPerLaunch];
  int block_to_chunk[kMaxBlocksPerLaunch];
  int64_t first_block;
};
static_assert(sizeof(NormLaunch) + 2 * sizeof(void*) <= kKernelParameterBytes,
              "the kernel's parameters exceed the parameter space");

// This thread's share of the n elements at x: 16-byte vectors where x is aligned, else elements.
template <NormKind K, typename S>
__device__ __forceinline__ double thread_share(const S* x, int64_t n, double p) {
  constexpr int kVec = kVectorBytes / sizeof(S);
  const int64_t vector_end = is_vector_aligned<kVec>(x) ? n - n % kVec : 0;
  double accumulated = 0.0;
  for (int64_t i = int64_t(threadIdx.x) * kVec; i < vector_end; i += int64_t(blockDim.x) * kVec) {
    S v[kVec];
    load_vector<kVec>(x + i, v);
#pragma unroll
    for (int j = 0; j < kVec; ++j) accumulated = NormMath<K>::add(accumulated, double(v[j]), p);
  }
  for (int64_t i = vector_end + threadIdx.x; i < n; i += blockDim.x) {
    accumulated = NormMath<K>::add(accumulated, double(x[i]), p);
  }
  return accumulated;
}

template <NormKind K>
__global__ void __launch_bounds__(kBlockSize)
    chunk_values_kernel(FASTOPT_KERNEL_PARAM(NormLaunch) launch, double p, double* values) {
  const int tensor = launch.block_to_tensor[blockIdx.x];
  const int64_t start = int64_t(launch.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t n = min(kChunkSize, launch.numels[tensor] - start);
  const void* x = launch.addresses[tensor];
  double value = 0.0;
  switch (launch.types[tensor]) {
    case ElementType::kFloat:
      value = thread_share<K>(static_cast<const float*>(x) + start, n, p);
      break;
    case ElementType::kDouble:
      value = thread_share<K>(static_cast<const double*>(x) + start, n, p);
      break;
    case ElementType::kHalf:
      value = thread_share<K>(static_cast<const c10::Half*>(x) + start, n, p);
      break;
    case ElementType::kBFloat16:
      value = thread_share<K>(static_cast<const c10::BFloat16*>(x) + start, n, p);
      break;
  }
  values[(launch.first_block + blockIdx.x) * blockDim.x + threadIdx.x] = value;
}

template <NormKind K>
__global__ void __launch_bounds__(kBlockSize)
    combine_strided_kernel(const double* values, int64_t count, double* combined) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  double accumulated = 0.0;
  for (int64_t i = k; i < count; i += kCombineThreads) {
    accumulated = NormMath<K>::combine(accumulated, values[i]);
  }
  combined[k] = accumulated;
}

template <NormKind K>
__global__ void finish_kernel(const double* combined, double p, const float* grad_scale,
                              void* result, bool result_is_double) {
  double accumulated = 0.0;
  for (int k = 0; k < kCombineThreads; ++k) {
    accumulated = NormMath<K>::combine(accumulated, combined[k]);
  }
  double norm = NormMath<K>::finish(accumulated, p);
  if (grad_scale != nullptr) norm /= fabs(double(*grad_scale));
  if (result_is_double) {
    *static_cast<double*>(result) = norm;
  } else {
    *static_cast<float*>(result) = static_cast<float>(norm);
  }
}

// Stage 1 over every chunk of every tensor; `values` has kBlockSize slots per chunk.
template <NormKind K>
void launch_chunk_values(at::TensorList tensors, double p, double* values) {
  NormLaunch launch;
  launch.first_block = 0;
  int n_tensors = 0;
  int n_blocks = 0;
  const auto flush = [&] {
    launch_kernel(&chunk_values_kernel<K>, n_blocks, kBlockSize, launch, p, values);
    launch.first_block += n_blocks;
    n_blocks = 0;
  };
  for (const at::Tensor& t : tensors) {
    const int64_t numel = t.numel();
    if (numel == 0) continue;
    if (n_tensors == kMaxTensorsPerLaunch) {
      flush();
      n_tensors = 0;
    }
    int slot = n_tensors++;
    launch.addresses[slot] = t.const_data_ptr();
    launch.numels[slot] = numel;
    launch.types[slot] = element_type(t.scalar_type());
    const int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
    for (int64_t c = 0; c < chunks; ++c) {
      if (n_blocks == kMaxBlocksPerLaunch) {  // the tensor goes on in the next launch, in slot 0
        flush();
        launch.addresses[0] = launch.addresses[slot];
        launch.numels[0] = launch.numels[slot];
        launch.types[0] = launch.types[slot];
        slot = 0;
        n_tensors = 1;
      }
      launch.block_to_tensor[n_blocks] = static_cast<unsigned char>(slot);
      launch.block_to_chunk[n_blocks] = static_cast<int>(c);
      ++n_blocks;
    }
  }
  if (n_blocks > 0) flush();
}

at::Tensor grad_norm_cuda(at::TensorList tensors, double norm_type,
                          const std::optional<at::Tensor>& grad_scale) {
  const at::ScalarType dtype = check_grad_norm(tensors, norm_type, grad_scale, kKernelDevice);
  const at::TensorOptions options = tensors[0].options();  // the dispatcher saw a tensor
  const DeviceGuard guard(options.device());
  at::Tensor result = at::empty({}, options.dtype(dtype));
  int64_t chunks = 0;
  for (const at::Tensor& t : tensors) chunks += (t.numel() + kChunkSize - 1) / kChunkSize;
  if (chunks == 0) return result.zero_();

  at::Tensor workspace =
      at::empty({chunks * kBlockSize + kCombineThreads}, options.dtype(at::kDouble));
  double* values = workspace.data_ptr<double>();
  double* combined = values + chunks * kBlockSize;
  const float* scale = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  switch_norm_kind(norm_type, [&](auto kind) {
    constexpr NormKind K = decltype(kind)::value;
    launch_chunk_values<K>(tensors, norm_type, values);
    launch_kernel(&combine_strided_kernel<K>, kCombineThreads / kBlockSize, kBlockSize,
                  static_cast<const double*>(values), chunks * kBlockSize, combined);
    launch_kernel(&finish_kernel<K>, 1, 1, static_cast<const double*>(combined), norm_type, scale,
                  result.data_ptr(), dtype == at::kDouble);
  });
  return result;
}

}  // namespace

FASTOPT_CUDA_KERNELS_IMPL(m) {
  m.impl("grad_norm", &grad_norm_cuda);
}

}  // namespace fastopt::cuda
