// Packing for the block-sparse kernels: operands are copied into fp32 panels laid out in the order
// the micro-kernel reads them, so that it streams contiguous memory and bf16 inputs are converted
// on this one pass rather than on every reuse (the dsd products pack one panel at a time, in the
// thread that uses it; the sdd product packs its operands once per call).
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
#include "layers/cpu/blocksparse_tile.h"
#include "layers/cpu/blocksparse_transpose.h"

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

// One panel for pack_row_panel: the first `rows` (at most panel_rows) rows of src, to be packed
// into out [width][panel_rows], the batch rows transposed, rows past `rows` being zeros.
// panel_rows is a multiple of the vector width (dsd_panel_rows), which divides width.
struct RowPanel {
  const void* src;  // [rows, width], contiguous
  int64_t rows;
  int64_t width;
  int64_t panel_rows;
  float* out;
};

// Each kLanes x kLanes tile of a group of kLanes rows is loaded a row per vector, transposed in
// registers and stored as kLanes lines of the panel.
template <typename V, typename S>
FASTOPT_INLINE void pack_row_panel(const RowPanel& s) {
  constexpr int kLanes = V::kLanes;
  const S* in = static_cast<const S*>(s.src);
  for (int64_t row0 = 0; row0 < s.panel_rows; row0 += kLanes) {
    const int64_t valid = std::clamp<int64_t>(s.rows - row0, 0, kLanes);
    float* group = s.out + row0;
    for (int64_t k0 = 0; k0 < s.width; k0 += kLanes) {
      typename V::T r[kLanes];
      for (int i = 0; i < kLanes; ++i) {
        r[i] = i < valid ? load_as_float<V>(in + (row0 + i) * s.width + k0) : V::zero();
      }
      transpose_tile<V>(r);
      for (int i = 0; i < kLanes; ++i) V::store(group + (k0 + i) * s.panel_rows, r[i]);
    }
  }
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
