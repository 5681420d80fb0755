// Packing for the block-sparse kernels: operands are copied once per call into fp32 panels laid
// out in the order the micro-kernel reads them, so that it streams contiguous memory and bf16
// inputs are converted on this one pass rather than on every reuse.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace fastopt::cpu::blocksparse {

// Rows of a dense operand per packed panel of the dsd products: a multiple of every tile height
// of blocksparse_tile.h's dsd tiles (24, 12, 6 and 4 rows), so each tile reads inside one panel.
constexpr int64_t kPanelRows = 24;

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

// src [rows, width] (contiguous) -> dst [ceil(rows / kPanelRows)][width][kPanelRows]: panel p
// holds rows p * kPanelRows.., transposed, rows past the end being zeros.
inline at::Tensor pack_row_panels(const at::Tensor& src) {
  const int64_t rows = src.size(0), width = src.size(1);
  const int64_t panels = (rows + kPanelRows - 1) / kPanelRows;
  at::Tensor dst = at::empty({panels, width, kPanelRows}, src.options().dtype(at::kFloat));
  float* out = dst.data_ptr<float>();
  switch_float_or_bfloat16(src.scalar_type(), [&]<typename S>() {
    const S* in = src.const_data_ptr<S>();
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        float* panel = out + p * width * kPanelRows;
        for (int64_t m = 0; m < kPanelRows; ++m) {
          const int64_t row = p * kPanelRows + m;
          if (row < rows) {
            const S* line = in + row * width;
            for (int64_t k = 0; k < width; ++k) panel[k * kPanelRows + m] = float(line[k]);
          } else {
            for (int64_t k = 0; k < width; ++k) panel[k * kPanelRows + m] = 0.0f;
          }
        }
      }
    });
  });
  return dst;
}

// src [rows, width] (contiguous), width = blocks * block -> dst [blocks][rows][block]: the
// columns of each block of columns, row after row (the operands of the sdd product).
inline at::Tensor pack_column_panels(const at::Tensor& src, int64_t block) {
  const int64_t rows = src.size(0), width = src.size(1), blocks = width / block;
  at::Tensor dst = at::empty({blocks, rows, block}, src.options().dtype(at::kFloat));
  float* out = dst.data_ptr<float>();
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
  return dst;
}

// values [nnz, block, block] -> dst [entries][block][block] with entry e holding the block
// values[order[e]] (values[e] without `order`), transposed when `transpose`: each entry is then
// the [depth][columns] operand of one step of a dsd product.
inline at::Tensor pack_blocks(const at::Tensor& values, const int64_t* order, int64_t entries,
                              bool transpose) {
  const int64_t block = values.size(1);
  at::Tensor dst = at::empty({entries, block, block}, values.options().dtype(at::kFloat));
  float* out = dst.data_ptr<float>();
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
  return dst;
}

}  // namespace fastopt::cpu::blocksparse
