// Multi-tensor apply: one kernel launch updates many tensors. Each CUDA block takes one chunk of
// one tensor; the tensors' addresses and the block-to-chunk map travel in the kernel's parameter
// space, so a launch needs no host-to-device copy and can be captured in a CUDA graph. Lists
// longer than one launch's capacity are split across launches; a tensor may span two launches.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "optim/cuda/launch.cuh"

namespace fastopt::cuda {

constexpr int kBlockSize = 512;
constexpr int64_t kChunkSize = 65536;  // elements per block

// A kernel's parameters may take 4 KiB, or 32764 bytes from CUDA 12.1 on with a driver of 12.1 or
// later (r530) on Volta or newer. Every GPU a CUDA 13 build runs on has that (CUDA 13 needs an
// r580 driver and a Turing or newer GPU); a CUDA 12.1-12.9 build may run on a 12.0 driver (minor
// version compatibility), so it keeps the 4 KiB capacity.
#if CUDART_VERSION >= 13000
constexpr size_t kKernelParameterBytes = 32764;
// Many small tensors (biases, norms) are what fills launches: 255 tensors (block_to_tensor is a
// byte) take one launch instead of eight. 320 chunks are 21M elements, whose memory traffic
// dwarfs a launch: more blocks per launch would buy nothing.
constexpr int kMaxTensorsPerLaunch = 255;
constexpr int kMaxBlocksPerLaunch = 320;
#else
constexpr size_t kKernelParameterBytes = 4096;
constexpr int kMaxTensorsPerLaunch = 28;
constexpr int kMaxBlocksPerLaunch = 160;
#endif

// Kernel parameters of one launch: DEPTH parallel lists (param, grad, state...) of up to
// kMaxTensorsPerLaunch tensors, each tensor's step counter and tag (what the functor needs to
// know of it beyond its memory), and which chunk each block takes.
template <int DEPTH>
struct TensorListMetadata {
  void* addresses[DEPTH][kMaxTensorsPerLaunch];
  int64_t numels[kMaxTensorsPerLaunch];
  float* steps[kMaxTensorsPerLaunch];
  uint64_t tags[kMaxTensorsPerLaunch];
  unsigned char block_to_tensor[kMaxBlocksPerLaunch];
  int block_to_chunk[kMaxBlocksPerLaunch];
};

template <int DEPTH, typename Functor, typename Args>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_kernel(FASTOPT_KERNEL_PARAM(TensorListMetadata<DEPTH>) meta, Functor functor,
                        Args args) {
  functor(meta, args);
}

// Runs Functor over every chunk of every tensor. lists[d][t] is list d's tensor t; all lists have
// the same length and matching sizes (an undefined tensor stands for one the functor never
// reads). steps[t] is tensor t's float32 step counter; tags[t] its tag, if any are given.
template <int DEPTH, typename Functor, typename Args>
void multi_tensor_apply(const std::array<std::vector<at::Tensor>, DEPTH>& lists,
                        const std::vector<at::Tensor>& steps, Functor functor, const Args& args,
                        const std::vector<uint64_t>& tags = {}) {
  static_assert(
      sizeof(TensorListMetadata<DEPTH>) + sizeof(Functor) + sizeof(Args) <= kKernelParameterBytes,
      "the kernel's parameters exceed the parameter space");
  TensorListMetadata<DEPTH> meta;
  int n_tensors = 0;
  int n_blocks = 0;
  auto launch = [&] {
    launch_kernel(&multi_tensor_kernel<DEPTH, Functor, Args>, n_blocks, kBlockSize, meta, functor,
                  args);
    n_blocks = 0;
  };
  for (size_t t = 0; t < lists[0].size(); ++t) {
    const int64_t numel = lists[0][t].numel();
    if (numel == 0) continue;
    for (int d = 0; d < DEPTH; ++d) {
      meta.addresses[d][n_tensors] = lists[d][t].defined() ? lists[d][t].data_ptr() : nullptr;
    }
    meta.numels[n_tensors] = numel;
    meta.steps[n_tensors] = steps[t].data_ptr<float>();
    meta.tags[n_tensors] = tags.empty() ? 0 : tags[t];
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
          meta.tags[0] = meta.tags[n_tensors - 1];
          n_tensors = 1;
        }
      }
    }
  }
  if (n_blocks > 0) launch();
}

}  // namespace fastopt::cuda
