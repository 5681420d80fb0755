// The block-sparse linear layer's three products on the CPU (fp32 and bf16 in, fp32 accumulate;
// fp64 in fp64):
//   blocksparse_linear             Y = X W^T + b       dense = dense x sparse^T  (dsd)
//   blocksparse_linear_grad_input  dX = dY W           dense = dense x sparse    (dsd)
//   blocksparse_linear_grad_values dW = dY^T X at W's stored blocks              (sdd)
// W is kept as blocks [nnz, B, B] with a block-CSR index over its block rows (crow, col, row of
// each block) and the transposed index over its block columns (ccol, row, block position).
//
// Both dsd products are one routine: output block column j sums, over the entries of its index
// row, a [rows, B] panel of the dense operand times a B x B block (as stored, or transposed for
// the forward pass). Threads own runs of (panel of batch rows, chunk of output block columns)
// balanced by their entry counts, and pack the panels they use themselves; the sdd product splits
// its blocks evenly. float64 (gradcheck, fp64 models) takes ATen's batched
// products over the stored blocks instead: exact in fp64 rather than fast.
//
// The argument checks that name the fix live in fastopt/_library.py and run first on every path;
// the ones here are those memory safety needs (shapes, dtypes, and the index contents, which only
// the kernel sees).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/einsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/denormal_modes.h"
#include "layers/cpu/blocksparse_pack.h"
#include "layers/cpu/blocksparse_tile.h"
#include "layers/cpu/blocksparse_transpose.h"

namespace fastopt::cpu::blocksparse {
namespace {

// Writes `rows` x `columns` floats of tile (row stride `ldt`), plus bias[column] when given, to
// out (row stride `ldo`) as S.
template <typename S>
FASTOPT_INLINE void write_tile(const float* tile, int64_t ldt, int rows, int columns,
                               const float* bias, S* out, int64_t ldo) {
  for (int m = 0; m < rows; ++m) {
    for (int j = 0; j < columns; ++j) {
      out[m * ldo + j] = S(tile[m * ldt + j] + (bias ? bias[j] : 0.0f));
    }
  }
}

// write_tile to out + offset, as out's dtype.
FASTOPT_INLINE void write_tile_as(c10::ScalarType dtype, const float* tile, int64_t ldt, int rows,
                                  int columns, const float* bias, void* out, int64_t offset,
                                  int64_t ldo) {
  if (dtype == c10::ScalarType::BFloat16) {
    write_tile(tile, ldt, rows, columns, bias, static_cast<c10::BFloat16*>(out) + offset, ldo);
  } else {
    write_tile(tile, ldt, rows, columns, bias, static_cast<float*>(out) + offset, ldo);
  }
}

// Writes the first `rows` batch rows of a dsd piece (kBlock features by kPanel batch rows, the
// micro-kernel's layout) to out (row stride ldo) as S, plus bias[feature] when given: transposed
// kLanes x kLanes at a time, so that every load and store is a whole vector. kStream: float
// output, aligned to the vector, written with streaming stores.
template <typename V, int kBlock, int kPanel, bool kStream, typename S>
FASTOPT_INLINE void write_piece(const float* piece, int rows, const float* bias, S* out,
                                int64_t ldo) {
  constexpr int kLanes = V::kLanes;
  for (int m0 = 0; m0 < rows; m0 += kLanes) {
    const int tile_rows = std::min(kLanes, rows - m0);
    for (int f0 = 0; f0 < kBlock; f0 += kLanes) {
      typename V::T r[kLanes];
      for (int i = 0; i < kLanes; ++i) r[i] = V::load(piece + (f0 + i) * kPanel + m0);
      transpose_tile<V>(r);
      const typename V::T b = bias ? V::load(bias + f0) : V::zero();
      for (int i = 0; i < tile_rows; ++i) {
        if constexpr (kStream) {
          V::stream(out + (m0 + i) * ldo + f0, r[i] + b);
        } else {
          store_as<V>(out + (m0 + i) * ldo + f0, r[i] + b);
        }
      }
    }
  }
}

// One thread's share of a dsd product: work units [first, last), unit u being the batch rows of
// panel u / chunks times the output block columns [column_cuts[c], column_cuts[c + 1]) of chunk
// c = u % chunks.
struct DsdShare {
  const void* dense;       // the dense operand [rows, depth], contiguous, of dtype out_dtype
  int64_t depth;           // its width
  const float* values;     // the weight's blocks as float32 [nnz, block, block]
  const int64_t* offsets;  // entries of output block column j: offsets[j]..offsets[j + 1]
  const int64_t* indices;  // the dense operand's block column of each entry
  const int64_t* order;    // the block of each entry (null: entry e is block e)
  const float* bias;       // [out_width] or null
  void* out;               // [rows, out_width]
  c10::ScalarType out_dtype;
  int64_t rows;
  int64_t out_width;
  int64_t block;
  int64_t panel_rows;
  const int64_t* column_cuts;  // [chunks + 1]
  int64_t chunks;
  bool wide;     // DsdTile<..., wide>
  bool by_rows;  // output features are the rows of the blocks (forward), else their columns
  bool stream;   // write the output with streaming stores (see dsd)
  int64_t first;
  int64_t last;
};

// Packs the kPanel batch rows of panel p of the dense operand (as S) into `panel`.
template <typename V, int kPanel, typename S>
FASTOPT_INLINE void pack_panel(const DsdShare& s, int64_t p, float* panel) {
  const int64_t row0 = p * kPanel;
  const RowPanel rows{static_cast<const S*>(s.dense) + row0 * s.depth,
                      std::min<int64_t>(kPanel, s.rows - row0), s.depth, kPanel, panel};
  pack_row_panel<V, S>(rows);
}

// Panels outer, block columns inner. A panel of the dense operand (depth x kPanel floats) is
// packed by the thread that uses it, just before, and stays in its L2 cache for all of the
// thread's block columns: read from the panel, each weight serves kPanel batch rows and each
// panel element only kRows features, so the panel is the operand to keep close, and the weights
// are the one to stream (prefetched a block ahead). For output block column j and the panel's
// rows: the panel's [block, rows] piece of the output, summed over the entries of j, entry after
// entry, in tiles of kRows features by kPanel rows, each broadcasting weights from the entry's
// block and loading batch rows from the panel's B rows of the entry, which stay in L1 for all the
// tiles of the entry (tiles outer, entries inner would read them from L2 once per tile); the
// tiles' sums wait in the piece, which is then written transposed, whole rows of the output at a
// time (and, j after j, whole rows of the output in turn).
template <typename V, int kBlock, bool kWide, bool kByRows>
FASTOPT_INLINE void dsd_share(const DsdShare& s) {
  using T = DsdTile<V, kBlock, kWide>;
  constexpr int kRows = T::kRows, kPanel = T::kPanelRows;
  // Within a block, the weight of feature f at depth k sits at f * kRowStride + k * kDepthStride.
  constexpr int kRowStride = kByRows ? kBlock : 1;
  constexpr int64_t kDepthStride = kByRows ? 1 : kBlock;
  // The cache lines of the weights one tile reads from a block: those of kRows whole rows
  // (forward), or one of each row (kRows <= 16 columns, within one line).
  constexpr int kLine = 64;
  constexpr int kTileWeightLines = kByRows ? kRows * kBlock * int(sizeof(float)) / kLine : kBlock;
  constexpr int kTileWeightLineStride = kByRows ? kLine : kBlock * int(sizeof(float));
  static_assert(kTileWeightLines <= kBlock, "one line per step of a tile");
  TORCH_INTERNAL_ASSERT(s.panel_rows == kPanel, "the instruction set changed during a call");
  float* panel = workspace(0, s.depth * kPanel);
  alignas(64) float piece[kBlock * kPanel];
  typename V::T acc[kRows][T::kVectors];
  int64_t packed = -1;
  for (int64_t u = s.first; u < s.last; ++u) {
    const int64_t p = u / s.chunks, c = u % s.chunks;
    if (p != packed) {
      if (s.out_dtype == c10::ScalarType::BFloat16) {
        pack_panel<V, kPanel, c10::BFloat16>(s, p, panel);
      } else {
        pack_panel<V, kPanel, float>(s, p, panel);
      }
      packed = p;
    }
    for (int64_t j = s.column_cuts[c]; j < s.column_cuts[c + 1]; ++j) {
      const int64_t begin = s.offsets[j], end = s.offsets[j + 1];
      if (begin == end) std::fill(piece, piece + kBlock * kPanel, 0.0f);
      for (int64_t e = begin; e < end; ++e) {
        const int64_t stored = s.order ? s.order[e] : e;
        const float* rows = panel + s.indices[e] * kBlock * kPanel;
        // The next entry's weights and panel rows (the last entry's: those of the first).
        const int64_t next = e + 1 < end ? e + 1 : begin;
        const float* next_block = s.values + (s.order ? s.order[next] : next) * kBlock * kBlock;
        for (int f0 = 0; f0 < kBlock; f0 += kRows) {
          e == begin ? zero_tile<V>(acc) : load_tile<V>(acc, piece + f0 * kPanel, kPanel);
          const PrefetchLines next_weights{
              reinterpret_cast<const char*>(next_block + f0 * kRowStride), kTileWeightLineStride,
              kTileWeightLines};
          accumulate_tile<V, kRowStride>(
              acc, s.values + stored * kBlock * kBlock + f0 * kRowStride, kDepthStride, rows,
              kPanel, kBlock, f0 == 0 ? panel + s.indices[next] * kBlock * kPanel : nullptr,
              next_weights);
          store_tile<V>(acc, piece + f0 * kPanel, kPanel, kRows);
        }
      }
      const int valid = int(std::min<int64_t>(kPanel, s.rows - p * kPanel));
      const int64_t offset = p * kPanel * s.out_width + j * kBlock;
      const float* bias = s.bias ? s.bias + j * kBlock : nullptr;
      if (s.out_dtype == c10::ScalarType::BFloat16) {
        write_piece<V, kBlock, kPanel, false>(
            piece, valid, bias, static_cast<c10::BFloat16*>(s.out) + offset, s.out_width);
      } else if (s.stream) {
        write_piece<V, kBlock, kPanel, true>(piece, valid, bias,
                                             static_cast<float*>(s.out) + offset, s.out_width);
      } else {
        write_piece<V, kBlock, kPanel, false>(piece, valid, bias,
                                              static_cast<float*>(s.out) + offset, s.out_width);
      }
    }
  }
  if (s.stream) stream_fence();
}

template <typename V, int kBlock>
FASTOPT_INLINE void dsd_share_by_block(const DsdShare& s) {
  if (s.wide) {
    s.by_rows ? dsd_share<V, kBlock, true, true>(s) : dsd_share<V, kBlock, true, false>(s);
  } else {
    s.by_rows ? dsd_share<V, kBlock, false, true>(s) : dsd_share<V, kBlock, false, false>(s);
  }
}

template <typename V>
FASTOPT_INLINE void dsd_share_body(const DsdShare& s) {
  switch (s.block) {
    case 16:
      return dsd_share_by_block<V, 16>(s);
    case 32:
      return dsd_share_by_block<V, 32>(s);
    case 64:
      return dsd_share_by_block<V, 64>(s);
  }
}

FASTOPT_DISPATCH_BY_VECTOR(run_dsd_share, dsd_share_body, DsdShare)

// The bytes of each sdd operand's chunk (see sdd_share): the two take a third to two thirds of a
// core's L1 data cache (48 KiB on recent x86 cores, 32 KiB on older ones).
constexpr int64_t kSddChunkBytes = int64_t(16) << 10;

// One thread's share of the sdd product: the stored blocks order[first], ..., order[last - 1].
struct SddShare {
  const float* left;     // pack_column_panels of dY: [row blocks][rows][block]
  const float* right;    // pack_column_panels of X: [column blocks][rows][block]
  const int64_t* order;  // sdd_block_order
  const int64_t* block_rows;
  const int64_t* block_cols;
  void* out;  // [nnz, block, block]
  c10::ScalarType out_dtype;
  int64_t rows;
  int64_t block;
  int64_t first;
  int64_t last;
};

// Each block is summed over the batch rows chunk by chunk: a chunk of both panels (kChunkRows
// rows of B columns each) is read from L2 once and stays in L1 for all the tiles of the block,
// whose sums wait in the output block (fp32) or a float block (bf16) between chunks (the whole
// depth at once would read the right panel from L2 once per tile row). Every element is still
// summed over the rows in order.
template <typename V, int kBlock>
FASTOPT_INLINE void sdd_share(const SddShare& s) {
  using T = SddTile<V, kBlock>;
  constexpr int kRows = T::kRows, kColumns = T::kColumns;
  constexpr int64_t kChunkRows = kSddChunkBytes / (kBlock * int64_t(sizeof(float)));
  constexpr int64_t kLine = 64;
  constexpr int64_t kTiles = (kBlock / kRows) * (kBlock / kColumns);
  const bool float_out = s.out_dtype == c10::ScalarType::Float;
  alignas(64) float converted[kBlock * kBlock];
  typename V::T acc[kRows][T::kVectors];
  for (int64_t position = s.first; position < s.last; ++position) {
    const int64_t e = s.order[position];
    const float* left = s.left + s.block_rows[e] * s.rows * kBlock;
    const float* right = s.right + s.block_cols[e] * s.rows * kBlock;
    float* sums = float_out ? static_cast<float*>(s.out) + e * kBlock * kBlock : converted;
    for (int64_t k0 = 0; k0 == 0 || k0 < s.rows; k0 += kChunkRows) {
      const int64_t depth = std::min(kChunkRows, s.rows - k0);
      // The chunk that follows (this block's next, or the next block's first), prefetched while
      // this one is summed, each tile taking its share of the lines of both panels' chunks, a
      // line of each per step.
      const char *next_left = nullptr, *next_right = nullptr;
      int64_t next_rows = 0;
      if (k0 + kChunkRows < s.rows) {
        next_left = reinterpret_cast<const char*>(left + (k0 + kChunkRows) * kBlock);
        next_right = reinterpret_cast<const char*>(right + (k0 + kChunkRows) * kBlock);
        next_rows = std::min(kChunkRows, s.rows - k0 - kChunkRows);
      } else if (position + 1 < s.last) {
        const int64_t next = s.order[position + 1];
        next_left = reinterpret_cast<const char*>(s.left + s.block_rows[next] * s.rows * kBlock);
        next_right = reinterpret_cast<const char*>(s.right + s.block_cols[next] * s.rows * kBlock);
        next_rows = std::min(kChunkRows, s.rows);
      }
      // The lines of each panel's next chunk (its rows are whole lines: 16 | B), and each tile's.
      const int64_t lines = next_rows * kBlock * int64_t(sizeof(float)) / kLine;
      const int64_t share = (lines + kTiles - 1) / kTiles;
      int64_t first_line = 0;
      for (int i0 = 0; i0 < kBlock; i0 += kRows) {
        for (int c0 = 0; c0 < kBlock; c0 += kColumns, first_line += share) {
          float* tile = sums + i0 * kBlock + c0;
          k0 == 0 ? zero_tile<V>(acc) : load_tile<V>(acc, tile, kBlock);
          const int64_t count = std::clamp<int64_t>(lines - first_line, 0, std::min(share, depth));
          const PrefetchLines left_lines{count ? next_left + first_line * kLine : nullptr, kLine,
                                         count};
          const PrefetchLines right_lines{count ? next_right + first_line * kLine : nullptr, kLine,
                                          count};
          accumulate_tile<V, 1>(acc, left + k0 * kBlock + i0, kBlock, right + k0 * kBlock + c0,
                                kBlock, depth, nullptr, left_lines, right_lines);
          store_tile<V>(acc, tile, kBlock, kRows);
        }
      }
    }
    if (!float_out) {
      write_tile_as(s.out_dtype, sums, kBlock, kBlock, kBlock, nullptr, s.out, e * kBlock * kBlock,
                    kBlock);
    }
  }
}

template <typename V>
FASTOPT_INLINE void sdd_share_body(const SddShare& s) {
  switch (s.block) {
    case 16:
      return sdd_share<V, 16>(s);
    case 32:
      return sdd_share<V, 32>(s);
    case 64:
      return sdd_share<V, 64>(s);
  }
}

FASTOPT_DISPATCH_BY_VECTOR(run_sdd_share, sdd_share_body, SddShare)

// The stored blocks in the order the sdd product computes them: by groups of `group_rows` block
// rows, within a group by block column, then as given. Each block reads a [rows, B] panel of dY
// (its block row) and one of X (its block column), from beyond L2 when a thread moves to a panel
// it has not used lately. In this order a thread keeps its group's dY panels in its L2 and moves
// along the X panels, reading each X panel once per group for all the group's blocks in that
// column, instead of once per block as in the layout's row-major order.
std::vector<int64_t> sdd_block_order(const int64_t* block_rows, const int64_t* block_cols,
                                     int64_t nnz, int64_t col_blocks, int64_t group_rows) {
  // A stable counting sort by (group, column).
  int64_t groups = 0;
  for (int64_t e = 0; e < nnz; ++e) groups = std::max(groups, block_rows[e] / group_rows + 1);
  const auto bucket = [&](int64_t e) {
    return block_rows[e] / group_rows * col_blocks + block_cols[e];
  };
  std::vector<int64_t> start(groups * col_blocks + 1, 0);
  for (int64_t e = 0; e < nnz; ++e) ++start[bucket(e) + 1];
  for (size_t b = 1; b < start.size(); ++b) start[b] += start[b - 1];
  std::vector<int64_t> order(nnz);
  for (int64_t e = 0; e < nnz; ++e) order[start[bucket(e)]++] = e;
  return order;
}

// ---- checks ---------------------------------------------------------------------------------

void check_index(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong && t.device().is_cpu(), op, ": ", name,
              " must be a 1-D int64 CPU tensor, got ", t.scalar_type(), " ", t.sizes(), " on ",
              t.device());
  // The kernels read the index as a plain array.
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (stride 1), got stride ",
              t.stride(0), "; pass ", name, ".contiguous()");
}

void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble, op, ": ", name,
              " is ", dtype, ", but the CPU kernels take float32, bfloat16 or float64");
}

// offsets is a valid offsets array over `entries` entries whose indices lie in [0, bound).
void check_compressed(const char* op, const char* offsets_name, const at::Tensor& offsets,
                      const char* indices_name, const at::Tensor& indices, int64_t bound) {
  check_index(op, offsets_name, offsets);
  check_index(op, indices_name, indices);
  TORCH_CHECK(offsets.numel() >= 1, op, ": ", offsets_name, " needs at least one element");
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  const int64_t n = offsets.numel() - 1;
  bool monotone = o[0] == 0 && o[n] == indices.numel();
  for (int64_t i = 0; i < n && monotone; ++i) monotone = o[i] <= o[i + 1];
  TORCH_CHECK(monotone, op, ": ", offsets_name, " must rise from 0 to the length of ", indices_name,
              " (", indices.numel(), ")");
  const int64_t* x = indices.const_data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(x, x + indices.numel(), [&](int64_t v) { return 0 <= v && v < bound; }),
              op, ": ", indices_name, " must lie in [0, ", bound, ")");
}

void check_dense(const char* op, const char* name, const at::Tensor& t, int64_t width,
                 c10::ScalarType dtype) {
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == width, op, ": ", name, " must end in ", width,
              " features, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype && t.device().is_cpu(), op, ": ", name,
              " must be a CPU tensor of the weight's dtype ", dtype, ", got ", t.scalar_type(),
              " on ", t.device());
}

int64_t check_values(const char* op, const at::Tensor& values, int64_t nnz) {
  TORCH_CHECK(values.dim() == 3 && values.size(1) == values.size(2) && values.size(0) == nnz, op,
              ": values must be [", nnz, ", B, B] (one block per index entry), got ",
              values.sizes());
  const int64_t block = values.size(1);
  TORCH_CHECK(block == 16 || block == 32 || block == 64, op,
              ": the CPU kernels take block sizes 16, 32 and 64, got ", block);
  TORCH_CHECK(values.device().is_cpu(), op, ": values must be on the CPU");
  check_float_dtype(op, "values", values);
  return block;
}

// ---- the products ---------------------------------------------------------------------------

// t [..., features] as a contiguous [rows, features] matrix (also for 0 features, where
// reshape(-1, 0) is ambiguous).
at::Tensor as_matrix(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d < t.dim() - 1; ++d) rows *= t.size(d);
  return t.reshape({rows, t.size(-1)}).contiguous();
}

// ---- float64: ATen products over the stored blocks ---------------------------------------------

// dsd in fp64: each entry's [rows, B] panel of the dense operand times its block, summed into the
// entry's output block column.
at::Tensor dsd_fp64(const at::Tensor& dense, const at::Tensor& values, const at::Tensor& offsets,
                    const at::Tensor& indices, const std::optional<at::Tensor>& order, bool by_rows,
                    const std::optional<at::Tensor>& bias) {
  const int64_t block = values.size(1), out_blocks = offsets.numel() - 1;
  const at::Tensor a = as_matrix(dense);
  const int64_t rows = a.size(0);
  std::vector<int64_t> out_shape(dense.sizes().begin(), dense.sizes().end());
  out_shape.back() = out_blocks * block;
  at::Tensor blocks = order.has_value() ? values.index_select(0, *order) : values;
  if (by_rows) blocks = blocks.transpose(1, 2);  // Y = X W^T: the blocks' rows are outputs
  const at::Tensor panels = a.view({rows, a.size(1) / block, block}).index_select(1, indices);
  const at::Tensor products = at::einsum("rnk,nko->rno", {panels, blocks});
  const at::Tensor owners =
      at::repeat_interleave(at::arange(out_blocks, offsets.options()), offsets.diff());
  at::Tensor out =
      at::zeros({rows, out_blocks, block}, a.options()).index_add_(1, owners, products);
  out = out.view({rows, out_blocks * block});
  if (bias.has_value()) out.add_(*bias);
  return out.view(out_shape);
}

// sdd in fp64: the stored block (r, c) of dY^T X.
at::Tensor sdd_fp64(const at::Tensor& grad_output, const at::Tensor& input,
                    const at::Tensor& row_indices, const at::Tensor& col_indices, int64_t block) {
  const at::Tensor dy = as_matrix(grad_output), x = as_matrix(input);
  const int64_t rows = x.size(0);
  const at::Tensor left = dy.view({rows, dy.size(1) / block, block}).index_select(1, row_indices);
  const at::Tensor right = x.view({rows, x.size(1) / block, block}).index_select(1, col_indices);
  return at::einsum("rni,rnk->nik", {left, right}).contiguous();
}

// Cuts [0, n) into `parts` contiguous ranges of about equal total cost[i].
std::vector<int64_t> balanced_cuts(const std::vector<int64_t>& cost, int64_t parts) {
  int64_t total = 0;
  for (int64_t c : cost) total += c;
  std::vector<int64_t> cuts(parts + 1, int64_t(cost.size()));
  cuts[0] = 0;
  int64_t sum = 0, part = 1;
  for (size_t i = 0; i < cost.size() && part < parts; ++i) {
    sum += cost[i];
    while (part < parts && sum * parts >= total * part) cuts[part++] = int64_t(i) + 1;
  }
  return cuts;
}

// Outputs of at least this size are written with streaming stores (a core's L2 is 1-2 MiB).
constexpr int64_t kStreamedOutputBytes = int64_t(4) << 20;
// The widest vector of the kernels: the alignment streaming stores need.
constexpr uintptr_t kVectorBytes = 64;

// out [rows, (offsets.numel() - 1) * B] (+ bias): see the file comment. `by_rows`: the output
// features are the rows of the blocks (forward), else their columns (grad_input).
at::Tensor dsd(const at::Tensor& dense, const at::Tensor& values, const at::Tensor& offsets,
               const at::Tensor& indices, const int64_t* order, bool by_rows,
               const std::optional<at::Tensor>& bias) {
  const int64_t block = values.size(1);
  const at::Tensor a = as_matrix(dense);
  const int64_t rows = a.size(0), out_blocks = offsets.numel() - 1;
  const int64_t out_width = out_blocks * block;
  std::vector<int64_t> out_shape(dense.sizes().begin(), dense.sizes().end());
  out_shape.back() = out_width;
  at::Tensor out = at::empty(out_shape, dense.options());
  if (out.numel() == 0) return out;

  // A batch that fits one vector takes the narrow tile; others the wide one.
  const bool wide = rows > dsd_panel_rows(false);
  const int64_t panel_rows = dsd_panel_rows(wide);
  // The kernel reads the blocks in place: only bf16 ones are converted (no transposition).
  const at::Tensor values_float = values.to(at::kFloat).contiguous();
  std::optional<at::Tensor> bias_float;
  if (bias.has_value()) bias_float = bias->to(at::kFloat).contiguous();
  // An output larger than the caches is written past them: its lines need not be read first,
  // and it would evict the operands, which are read again.
  const bool stream = out.scalar_type() == at::kFloat && out.nbytes() >= kStreamedOutputBytes &&
                      reinterpret_cast<uintptr_t>(out.data_ptr()) % kVectorBytes == 0;
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  // Cost of an output block column: its entries, and one for writing it.
  std::vector<int64_t> cost(out_blocks);
  for (int64_t j = 0; j < out_blocks; ++j) cost[j] = o[j + 1] - o[j] + 1;
  // The block columns are cut into one chunk per thread, and the work into units (panel, chunk),
  // panel by panel; each thread takes a run of units of about equal cost, so that it packs each of
  // its panels once (a panel cut between two threads is packed by both), and a batch of one panel
  // is still shared.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::min<int64_t>(threads, out_blocks);
  const std::vector<int64_t> column_cuts = balanced_cuts(cost, chunks);
  const int64_t panels = (rows + panel_rows - 1) / panel_rows;
  std::vector<int64_t> unit_cost(panels * chunks);
  for (int64_t u = 0; u < panels * chunks; ++u) {
    const int64_t c = u % chunks;
    for (int64_t j = column_cuts[c]; j < column_cuts[c + 1]; ++j) unit_cost[u] += cost[j];
  }
  const int64_t workers = std::min<int64_t>(threads, panels * chunks);
  const std::vector<int64_t> cuts = balanced_cuts(unit_cost, workers);
  const DsdShare base{a.const_data_ptr(),
                      a.size(1),
                      values_float.const_data_ptr<float>(),
                      o,
                      indices.const_data_ptr<int64_t>(),
                      order,
                      bias_float ? bias_float->const_data_ptr<float>() : nullptr,
                      out.data_ptr(),
                      out.scalar_type(),
                      rows,
                      out_width,
                      block,
                      panel_rows,
                      column_cuts.data(),
                      chunks,
                      wide,
                      by_rows,
                      stream,
                      0,
                      0};
  parallel_for_in_callers_denormal_modes(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      DsdShare share = base;
      share.first = cuts[t];
      share.last = cuts[t + 1];
      run_dsd_share(share);
    }
  });
  return out;
}

// The dY panels of one group of sdd_block_order: half of a 2 MiB L2 per core, leaving the rest
// to the X panel in use and the output (on a core with less L2 the groups stay correct, only
// less of their panels stays cached).
constexpr int64_t kSddGroupPanelBytes = int64_t(1) << 20;

constexpr const char* kForward = "fastopt.blocksparse_linear";
constexpr const char* kGradInput = "fastopt.blocksparse_linear_grad_input";
constexpr const char* kGradValues = "fastopt.blocksparse_linear_grad_values";

at::Tensor blocksparse_linear_cpu(const at::Tensor& input, const at::Tensor& values,
                                  const std::optional<at::Tensor>& bias,
                                  const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                  const at::Tensor& row_indices, const at::Tensor& ccol_indices,
                                  const at::Tensor& t_row_indices,
                                  const at::Tensor& t_block_indices) {
  const int64_t block = check_values(kForward, values, col_indices.numel());
  const int64_t in_blocks = ccol_indices.numel() - 1;
  check_compressed(kForward, "crow_indices", crow_indices, "col_indices", col_indices, in_blocks);
  check_dense(kForward, "input", input, in_blocks * block, values.scalar_type());
  if (bias.has_value()) {
    const int64_t out_features = (crow_indices.numel() - 1) * block;
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, kForward, ": bias must be [",
                out_features, "], got ", bias->sizes());
    check_dense(kForward, "bias", *bias, out_features, values.scalar_type());
  }
  if (values.scalar_type() == at::kDouble) {
    return dsd_fp64(input, values, crow_indices, col_indices, std::nullopt, /*by_rows=*/true, bias);
  }
  return dsd(input, values, crow_indices, col_indices, nullptr, /*by_rows=*/true, bias);
}

at::Tensor blocksparse_linear_grad_input_cpu(const at::Tensor& grad_output,
                                             const at::Tensor& values,
                                             const at::Tensor& ccol_indices,
                                             const at::Tensor& t_row_indices,
                                             const at::Tensor& t_block_indices) {
  const int64_t nnz = t_row_indices.numel();
  const int64_t block = check_values(kGradInput, values, nnz);
  TORCH_CHECK(grad_output.dim() >= 1 && grad_output.size(-1) % block == 0, kGradInput,
              ": grad_output must end in a multiple of the block size ", block, ", got shape ",
              grad_output.sizes());
  const int64_t out_blocks = grad_output.size(-1) / block;
  check_compressed(kGradInput, "ccol_indices", ccol_indices, "t_row_indices", t_row_indices,
                   out_blocks);
  check_index(kGradInput, "t_block_indices", t_block_indices);
  TORCH_CHECK(t_block_indices.numel() == nnz, kGradInput,
              ": t_block_indices must have one entry per block");
  const int64_t* order = t_block_indices.const_data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(order, order + nnz, [&](int64_t v) { return 0 <= v && v < nnz; }),
              kGradInput, ": t_block_indices must lie in [0, ", nnz, ")");
  check_dense(kGradInput, "grad_output", grad_output, out_blocks * block, values.scalar_type());
  if (values.scalar_type() == at::kDouble) {
    return dsd_fp64(grad_output, values, ccol_indices, t_row_indices, t_block_indices,
                    /*by_rows=*/false, std::nullopt);
  }
  return dsd(grad_output, values, ccol_indices, t_row_indices, order, /*by_rows=*/false,
             std::nullopt);
}

at::Tensor blocksparse_linear_grad_values_cpu(const at::Tensor& grad_output,
                                              const at::Tensor& input,
                                              const at::Tensor& row_indices,
                                              const at::Tensor& col_indices, int64_t block) {
  TORCH_CHECK(block == 16 || block == 32 || block == 64, kGradValues,
              ": the CPU kernels take block sizes 16, 32 and 64, got ", block);
  const c10::ScalarType dtype = input.scalar_type();
  check_float_dtype(kGradValues, "input", input);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) % block == 0, kGradValues,
              ": input must end in a multiple of the block size ", block, ", got shape ",
              input.sizes());
  TORCH_CHECK(grad_output.dim() >= 1 && grad_output.size(-1) % block == 0, kGradValues,
              ": grad_output must end in a multiple of the block size ", block, ", got shape ",
              grad_output.sizes());
  check_dense(kGradValues, "input", input, input.size(-1), dtype);
  check_dense(kGradValues, "grad_output", grad_output, grad_output.size(-1), dtype);
  TORCH_CHECK(input.sizes().slice(0, input.dim() - 1) ==
                  grad_output.sizes().slice(0, grad_output.dim() - 1),
              kGradValues, ": input ", input.sizes(), " and grad_output ", grad_output.sizes(),
              " must have the same batch shape");
  const int64_t nnz = col_indices.numel();
  for (auto [name, t, bound] : {std::tuple{"row_indices", &row_indices, grad_output.size(-1)},
                                std::tuple{"col_indices", &col_indices, input.size(-1)}}) {
    check_index(kGradValues, name, *t);
    TORCH_CHECK(t->numel() == nnz, kGradValues, ": row_indices and col_indices differ in length");
    const int64_t* x = t->const_data_ptr<int64_t>();
    TORCH_CHECK(std::all_of(x, x + nnz, [&](int64_t v) { return 0 <= v && v < bound / block; }),
                kGradValues, ": ", name, " must lie in [0, ", bound / block, ")");
  }

  if (dtype == at::kDouble) return sdd_fp64(grad_output, input, row_indices, col_indices, block);
  at::Tensor out = at::empty({nnz, block, block}, input.options());
  if (nnz == 0) return out;
  const at::Tensor x = as_matrix(input);
  const at::Tensor dy = as_matrix(grad_output);
  const int64_t* block_rows = row_indices.const_data_ptr<int64_t>();
  const int64_t* block_cols = col_indices.const_data_ptr<int64_t>();
  const int64_t panel_bytes = std::max<int64_t>(1, x.size(0) * block * int64_t(sizeof(float)));
  // When all of X's panels (as floats) fit in the budget they stay in L2 in any order, and the
  // layout's order writes the output blocks one after the other (a small batch is bound by that
  // write).
  std::vector<int64_t> order(nnz);
  if (x.numel() * int64_t(sizeof(float)) <= kSddGroupPanelBytes) {
    std::iota(order.begin(), order.end(), int64_t(0));
  } else {
    order = sdd_block_order(block_rows, block_cols, nnz, x.size(1) / block,
                            std::max<int64_t>(1, kSddGroupPanelBytes / panel_bytes));
  }
  const SddShare base{pack_column_panels(dy, block, 0),
                      pack_column_panels(x, block, 1),
                      order.data(),
                      block_rows,
                      block_cols,
                      out.data_ptr(),
                      dtype,
                      x.size(0),
                      block,
                      0,
                      0};
  parallel_for_in_callers_denormal_modes(0, nnz, 1, [&](int64_t begin, int64_t end) {
    SddShare share = base;
    share.first = begin;
    share.last = end;
    run_sdd_share(share);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("blocksparse_linear", &blocksparse_linear_cpu);
  m.impl("blocksparse_linear_grad_input", &blocksparse_linear_grad_input_cpu);
  m.impl("blocksparse_linear_grad_values", &blocksparse_linear_grad_values_cpu);
}

}  // namespace fastopt::cpu::blocksparse
