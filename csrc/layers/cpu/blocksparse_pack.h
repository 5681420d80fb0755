// Packing for the block-sparse kernels: operands are copied once per call into fp32 panels laid
// out in the order the micro-kernel reads them, so that it streams contiguous memory and bf16
// inputs are converted on this one pass rather than on every reuse.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/macros.h"

namespace fastopt::cpu::blocksparse {

// A buffer of at least `size` floats owned by the calling thread and reused by its later calls
// (slot: which of the call's buffers). A fresh multi-megabyte allocation is mapped and page-faulted
// anew on every call, which costs more than the packing itself.
inline float* workspace(int slot, int64_t size) {
  thread_local std::vector<float> buffers[2];
  std::vector<float>& buffer = buffers[slot];
  if (int64_t(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// Calls f.template operator()<S>() with S the C++ type of `dtype` (float or bfloat16).
template <typename F>
void switch_float_or_bfloat16(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return f.template operator()<float>();
    case c10::ScalarType::BFloat16:
      return f.template operator()<c10::BFloat16>();
    default:
      TORCH_CHECK(false, "fastopt block-sparse CPU kernels take float32 or bfloat16, not ", dtype,
                  ": use .float() or .bfloat16() on the CPU");
  }
}

// src [rows, width] (contiguous) -> [ceil(rows / panel_rows)][width][panel_rows] in workspace
// `slot`: panel p holds rows p * panel_rows.., transposed, rows past the end being zeros.
inline const float* pack_row_panels(const at::Tensor& src, int64_t panel_rows, int slot) {
  const int64_t rows = src.size(0), width = src.size(1);
  const int64_t panels = (rows + panel_rows - 1) / panel_rows;
  float* out = workspace(slot, panels * width * panel_rows);
  switch_float_or_bfloat16(src.scalar_type(), [&]<typename S>() {
    const S* in = src.const_data_ptr<S>();
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        float* panel = out + p * width * panel_rows;
        const S* first = in + p * panel_rows * width;
        const int64_t valid = std::min(panel_rows, rows - p * panel_rows);
        // Written in order, read along panel_rows rows at once.
        for (int64_t k = 0; k < width; ++k) {
          float* line = panel + k * panel_rows;
          for (int64_t m = 0; m < valid; ++m) line[m] = float(first[m * width + k]);
          for (int64_t m = valid; m < panel_rows; ++m) line[m] = 0.0f;
        }
      }
    });
  });
  return out;
}

// src [rows, width] (contiguous), width = blocks * block -> [blocks][rows][block] in workspace
// `slot`: the columns of each block of columns, row after row (the operands of the sdd product).
inline const float* pack_column_panels(const at::Tensor& src, int64_t block, int slot) {
  const int64_t rows = src.size(0), width = src.size(1), blocks = width / block;
  float* out = workspace(slot, blocks * rows * block);
  switch_float_or_bfloat16(src.scalar_type(), [&]<typename S>() {
    const S* in = src.const_data_ptr<S>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t n = 0; n < rows; ++n) {
          const S* from = in + n * width + c * block;
          float* to = out + (c * rows + n) * block;
          for (int64_t j = 0; j < block; ++j) to[j] = float(from[j]);
        }
      }
    });
  });
  return out;
}

}  // namespace fastopt::cpu::blocksparse
