// Multi-tensor apply: one kernel launch updates many tensors. Each CUDA block takes one chunk of
// one tensor; the tensors' addresses and the block-to-chunk map travel in the kernel's parameter
// space, so a launch needs no host-to-device copy and can be captured in a CUDA graph. Lists
// longer than one launch's capacity are split across launches; a tensor may span two launches.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <array>
#include <cstdint>

namespace fastopt::cuda {

constexpr int kBlockSize = 512;
constexpr int64_t kChunkSize = 65536;  // elements per block
constexpr int kMaxTensorsPerLaunch = 36;
constexpr int kMaxBlocksPerLaunch = 320;

// Kernel parameters of one launch: DEPTH parallel lists (param, grad, state...) of up to
// kMaxTensorsPerLaunch tensors, each tensor's step counter, and which chunk each block takes.
// DEPTH = 5 with these limits keeps it under the classic 4 KiB kernel parameter limit.
template <int DEPTH>
struct TensorListMetadata {
  void* addresses[DEPTH][kMaxTensorsPerLaunch];
  int64_t numels[kMaxTensorsPerLaunch];
  float* steps[kMaxTensorsPerLaunch];
  unsigned char block_to_tensor[kMaxBlocksPerLaunch];
  int block_to_chunk[kMaxBlocksPerLaunch];
};

template <int DEPTH, typename Functor, typename Args>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_kernel(const __grid_constant__ TensorListMetadata<DEPTH> meta, Functor functor,
                        Args args) {
  functor(meta, args);
}

// Runs Functor over every chunk of every tensor. lists[d][t] is list d's tensor t; all lists have
// the same length and matching sizes. steps[t] is tensor t's float32 step counter.
template <int DEPTH, typename Functor, typename Args>
void multi_tensor_apply(const std::array<std::vector<at::Tensor>, DEPTH>& lists,
                        const std::vector<at::Tensor>& steps, Functor functor, const Args& args) {
  static_assert(sizeof(TensorListMetadata<DEPTH>) + sizeof(Args) < 4000,
                "kernel parameters exceed 4 KiB");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TensorListMetadata<DEPTH> meta;
  int n_tensors = 0;
  int n_blocks = 0;
  auto launch = [&] {
    multi_tensor_kernel<DEPTH><<<n_blocks, kBlockSize, 0, stream>>>(meta, functor, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    n_blocks = 0;
  };
  for (size_t t = 0; t < lists[0].size(); ++t) {
    const int64_t numel = lists[0][t].numel();
    if (numel == 0) continue;
    for (int d = 0; d < DEPTH; ++d) meta.addresses[d][n_tensors] = lists[d][t].data_ptr();
    meta.numels[n_tensors] = numel;
    meta.steps[n_tensors] = steps[t].data_ptr<float>();
    ++n_tensors;
    const int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[n_blocks] = static_cast<unsigned char>(n_tensors - 1);
      meta.block_to_chunk[n_blocks] = static_cast<int>(c);
      ++n_blocks;
      const bool last_chunk = c == chunks - 1;
      if (n_blocks == kMaxBlocksPerLaunch || (n_tensors == kMaxTensorsPerLaunch && last_chunk)) {
        launch();
        if (last_chunk) {
          n_tensors = 0;
        } else {  // this tensor goes on in the next launch, from slot 0
          for (int d = 0; d < DEPTH; ++d) meta.addresses[d][0] = meta.addresses[d][n_tensors - 1];
          meta.numels[0] = meta.numels[n_tensors - 1];
          meta.steps[0] = meta.steps[n_tensors - 1];
          n_tensors = 1;
        }
      }
    }
  }
  if (n_blocks > 0) launch();
}

}  // namespace fastopt::cuda
