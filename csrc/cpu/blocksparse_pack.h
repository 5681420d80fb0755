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

// Rows of a dense operand per packed panel of the dsd products: a multiple of every tile height
// of blocksparse_tile.h's dsd tiles (24, 12, 6 and 4 rows), so each tile reads inside one panel.
constexpr int64_t kPanelRows = 24;

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
      TORCH_CHECK(false, "fastopt block-sparse CPU kernels take float32 or bfloat16, not ", dtype);
  }
}

// src [rows, width] (contiguous) -> [ceil(rows / kPanelRows)][width][kPanelRows] in workspace
// `slot`: panel p holds rows p * kPanelRows.., transposed, rows past the end being zeros.
inline const float* pack_row_panels(const at::Tensor& src, int slot) {
  const int64_t rows = src.size(0), width = src.size(1);
  const int64_t panels = (rows + kPanelRows - 1) / kPanelRows;
  float* out = workspace(slot, panels * width * kPanelRows);
  switch_float_or_bfloat16(src.scalar_type(), [&]<typename S>() {
    const S* in = src.const_data_ptr<S>();
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        float* panel = out + p * width * kPanelRows;
        const S* first = in + p * kPanelRows * width;
        const int64_t valid = std::min(kPanelRows, rows - p * kPanelRows);
        // Written in order, read along kPanelRows rows at once.
        for (int64_t k = 0; k < width; ++k) {
          float* line = panel + k * kPanelRows;
          for (int64_t m = 0; m < valid; ++m) line[m] = float(first[m * width + k]);
          for (int64_t m = valid; m < kPanelRows; ++m) line[m] = 0.0f;
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

// values [nnz, block, block] -> [entries][block][block] in workspace `slot`, entry e holding the
// block values[order[e]] (values[e] without `order`), transposed when `transpose`: each entry is
// then the [depth][columns] operand of one step of a dsd product.
inline const float* pack_blocks(const at::Tensor& values, const int64_t* order, int64_t entries,
                                bool transpose, int slot) {
  const int64_t block = values.size(1);
  float* out = workspace(slot, entries * block * block);
  switch_float_or_bfloat16(values.scalar_type(), [&]<typename S>() {
    const S* in = values.const_data_ptr<S>();
    at::parallel_for(0, entries, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        const S* from = in + (order ? order[e] : e) * block * block;
        float* to = out + e * block * block;
        for (int64_t i = 0; i < block; ++i) {
          for (int64_t j = 0; j < block; ++j) {
            to[i * block + j] = float(transpose ? from[j * block + i] : from[i * block + j]);
          }
        }
      }
    });
  });
  return out;
}

}  // namespace fastopt::cpu::blocksparse
