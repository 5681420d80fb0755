// fastopt::int8_mm and fastopt::int8_linear on the CPU: activations staged once per call
// (quantized per row, or widened to fp32), then panel-major tiles over the packed weight in
// parallel, each finished by a fused epilogue (weight compensation, both scales, bias, cast).
// No FMA contraction in this file: the epilogue rounds the scaled sum before adding the bias, as
// torch eager's fake quantization does, so that every instruction set gives the same bits (GCC
// otherwise fuses them wherever the target has FMA, and contracts across statements).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu/denormal_modes.h"
#include "cpu/dtype_switch.h"
#include "cpu/isa.h"
#include "layers/cpu/activation.h"
#include "layers/cpu/int8_tiles.h"

namespace fastopt::cpu::int8 {
namespace {

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// ---- Argument checks: what memory safety needs. The checks that name the argument and the fix
// are fastopt/_library.py's, which every caller (fastopt.functional, the fake, the Triton
// launcher) runs first; these catch a direct torch.ops call that skipped them.

void require(bool ok, const char* op, const char* what) {
  TORCH_CHECK(ok, op, ": ", what, " (fastopt.functional.", op + sizeof("fastopt.") - 1,
              " explains its arguments)");
}

bool is_cpu_vector(const at::Tensor& t, c10::ScalarType dtype, int64_t length) {
  return t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == length && t.device().is_cpu();
}

void check_packed_weight(const char* op, const at::Tensor& input, const at::Tensor& packed,
                         const at::Tensor& compensation, int64_t in_features) {
  require(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(2) == kBlockN &&
              packed.size(3) == kGroupK && packed.is_contiguous() && packed.device().is_cpu(),
          op, "packed_weight must be a contiguous int8 [N/16, K/4, 16, 4] CPU tensor");
  require(input.dim() >= 1 && input.size(-1) == in_features &&
              ceil_div(in_features, kGroupK) == packed.size(1) && in_features <= kMaxInFeatures,
          op, "input, in_features and packed_weight disagree on the input features");
  require(compensation.scalar_type() == at::kInt && compensation.dim() == 1 &&
              ceil_div(compensation.size(0), kBlockN) == packed.size(0) &&
              compensation.is_contiguous() && compensation.device().is_cpu(),
          op,
          "weight_compensation must be a contiguous int32 [N] CPU tensor fitting packed_weight");
}

void check_linear_args(const at::Tensor& input, const at::Tensor& packed,
                       const at::Tensor& compensation, int64_t in_features,
                       const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& input_scale) {
  constexpr const char* op = "fastopt.int8_linear";
  const auto dtype = input.scalar_type();
  require(
      dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
      op, "input must be float32, bfloat16, float16 or float64");
  check_packed_weight(op, input, packed, compensation, in_features);
  const int64_t n = compensation.size(0);
  require(is_cpu_vector(weight_scale, at::kFloat, n), op,
          "weight_scale must be a float32 [N] CPU tensor");
  require(!bias.has_value() || is_cpu_vector(*bias, dtype, n), op,
          "bias must be an [N] CPU tensor of the input's dtype");
  require(!input_scale.has_value() || is_cpu_vector(*input_scale, at::kFloat, in_features), op,
          "input_scale must be a float32 [K] CPU tensor");
}

// ---- Staging: the input rows, read once, into the layout the tiles read. ----

// Staged rows are this many elements longer than the packed K: rows a power of two apart (K =
// 4096) fall in one L1 set, and a tile reading 8 or 16 rows at once would evict its own lines.
constexpr int64_t kActivationRowPad = 64;

struct StageArgs {
  const void* input;   // [rows, k] of the input's dtype
  const float* scale;  // optional [k] per-input-channel multiplier (SmoothQuant)
  int64_t k;
  int64_t padded_k;    // a multiple of kGroupK; the padding is written as zeros
  int64_t begin, end;  // rows
  int64_t row_stride;  // elements between staged rows (of either kind)
  uint8_t* quantized;  // QuantizeRows: rows of padded_k int8 (or uint8 + 128)
  float* row_scales;   // QuantizeRows: [rows]
  bool unsigned_activations;
  float* widened;  // WidenRows: rows of padded_k fp32
};

template <typename S, bool SMOOTH>
FASTOPT_INLINE float staged_value(const StageArgs& s, const S* x, int64_t k) {
  return SMOOTH ? float(x[k]) * s.scale[k] : float(x[k]);
}

// Adding and subtracting 1.5 * 2^23 rounds |r| < 2^22 to an integer, ties to even (as
// std::nearbyint and torch.round do), in a form every instruction set vectorizes.
constexpr float kRoundingBias = 12582912.0f;
// Lanes of the max|v| loop: an elementwise max over a fixed array vectorizes, where a float max
// reduction would not (it is not associative for NaN without -ffast-math).
constexpr int kMaxLanes = 16;

// Symmetric per-row int8: scale = max|v| / 127 (1 for an all-zero row), q = round(v / scale)
// with ties to even, as torch.round; v = x * input_scale in fp32.
struct QuantizeRows {
  template <typename S>
  FASTOPT_INLINE static void run(const StageArgs& s) {
    s.scale == nullptr ? rows<S, false>(s) : rows<S, true>(s);
  }

  template <typename S, bool SMOOTH>
  FASTOPT_INLINE static void rows(const StageArgs& s) {
    // Locals, not fields of `s`: the uint8 stores could alias those, which stops vectorization.
    const int64_t k_end = s.k, padded_k = s.padded_k;
    const int offset = s.unsigned_activations ? 128 : 0;
    for (int64_t m = s.begin; m < s.end; ++m) {
      const S* x = static_cast<const S*>(s.input) + m * k_end;
      float lanes[kMaxLanes] = {};
      int64_t k = 0;
      for (; k + kMaxLanes <= k_end; k += kMaxLanes) {
        for (int j = 0; j < kMaxLanes; ++j) {
          const float v = std::fabs(staged_value<S, SMOOTH>(s, x, k + j));
          lanes[j] = lanes[j] > v ? lanes[j] : v;
        }
      }
      float amax = 0.0f;
      for (; k < k_end; ++k) amax = std::max(amax, std::fabs(staged_value<S, SMOOTH>(s, x, k)));
      for (int j = 0; j < kMaxLanes; ++j) amax = std::max(amax, lanes[j]);
      const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
      uint8_t* __restrict__ q = s.quantized + m * s.row_stride;
      for (k = 0; k < k_end; ++k) {
        float r = (staged_value<S, SMOOTH>(s, x, k) / scale + kRoundingBias) - kRoundingBias;
        r = r < -127.0f ? -127.0f : r;
        r = r > 127.0f ? 127.0f : r;
        q[k] = uint8_t(int(r) + offset);
      }
      for (k = k_end; k < padded_k; ++k) q[k] = uint8_t(offset);
      s.row_scales[m] = scale;
    }
  }
};

struct WidenRows {
  template <typename S>
  FASTOPT_INLINE static void run(const StageArgs& s) {
    for (int64_t m = s.begin; m < s.end; ++m) {
      const S* x = static_cast<const S*>(s.input) + m * s.k;
      float* y = s.widened + m * s.row_stride;
      if (s.scale == nullptr) {
        for (int64_t k = 0; k < s.k; ++k) y[k] = staged_value<S, false>(s, x, k);
      } else {
        for (int64_t k = 0; k < s.k; ++k) y[k] = staged_value<S, true>(s, x, k);
      }
      for (int64_t k = s.k; k < s.padded_k; ++k) y[k] = 0.0f;
    }
  }
};

struct StageCall {
  c10::ScalarType dtype;
  bool quantize;
  StageArgs args;
};

FASTOPT_INLINE void stage_rows_body(const StageCall& call) {
  call.quantize ? switch_param_dtype<QuantizeRows>(call.dtype, call.args)
                : switch_param_dtype<WidenRows>(call.dtype, call.args);
}

FASTOPT_DISPATCH_BY_ISA(stage_rows, stage_rows_body, StageCall)

void stage_rows_in_parallel(const at::Tensor& x, const float* input_scale, int64_t padded_k,
                            StageArgs args, bool quantize) {
  const int64_t rows = x.size(0), k = x.size(1);
  args.input = x.const_data_ptr();
  args.scale = input_scale;
  args.k = k;
  args.padded_k = padded_k;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1));
  parallel_for_in_callers_denormal_modes(0, rows, grain, [&](int64_t begin, int64_t end) {
    StageArgs part = args;
    part.begin = begin;
    part.end = end;
    stage_rows(StageCall{x.scalar_type(), quantize, part});
  });
}

// ---- float64 (gradcheck, fp64 models): the same math in fp64, composed of ATen ops. ----

// y = fake_quantize(x * input_scale) @ (weight * weight_scale[:, None]).T + bias, in fp64: with
// `quantize_input`, each row rounded to int8 with scale max|row| / 127 (the int32 sums of the
// other dtypes are exact in fp64 too); without, x * input_scale itself. Then the activation.
at::Tensor int8_linear_fp64(const at::Tensor& input, const at::Tensor& packed,
                            const at::Tensor& compensation, int64_t in_features,
                            const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& input_scale, bool quantize_input,
                            Activation activation) {
  const int64_t n = compensation.size(0);
  const at::Tensor weight = packed.permute({0, 2, 1, 3})
                                .reshape({packed.size(0) * kBlockN, packed.size(1) * kGroupK})
                                .narrow(0, 0, n)
                                .narrow(1, 0, in_features)
                                .to(at::kDouble);
  at::Tensor x = input_scale.has_value() ? input.mul(input_scale->to(at::kDouble)) : input;
  at::Tensor row_scale;
  if (quantize_input && in_features > 0) {
    const at::Tensor amax = x.abs().amax({-1}, /*keepdim=*/true);
    row_scale = at::where(amax.gt(0), amax.div(127), at::ones_like(amax));
    x = x.div(row_scale).round().clamp(-127, 127);
  }
  at::Tensor out = at::matmul(x, weight.t());
  if (row_scale.defined()) out = out.mul(row_scale);
  out = out.mul(weight_scale.to(at::kDouble));
  if (bias.has_value()) out = out.add(*bias);
  return activation == Activation::kGelu ? at::gelu(out) : out;
}

// ---- Tiles: panel-major, so each thread reuses a panel of the weight for every row tile. ----

// Calls tile(row0, rows, block0, blocks) over every tile of [rows_total, blocks_total] in
// parallel, each thread between start() and finish().
template <typename TileFn>
void for_each_tile_in_parallel(int64_t rows_total, int64_t blocks_total, int64_t padded_k,
                               void (*start)(), void (*finish)(), const TileFn& tile) {
  const int64_t row_tiles = ceil_div(rows_total, kTileRows);
  const int64_t panels = ceil_div(blocks_total, kPanelBlocks);
  // About a million multiply-adds per task before forking pays off.
  const int64_t work_per_tile = kTileRows * kPanelCols * std::max<int64_t>(padded_k, 1);
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / work_per_tile);
  parallel_for_in_callers_denormal_modes(
      0, row_tiles * panels, grain, [&](int64_t begin, int64_t end) {
        start();
        for (int64_t i = begin; i < end; ++i) {
          const int64_t panel = i / row_tiles, row_tile = i % row_tiles;
          const int64_t row0 = row_tile * kTileRows, block0 = panel * kPanelBlocks;
          tile(row0, int(std::min<int64_t>(kTileRows, rows_total - row0)), block0,
               int(std::min<int64_t>(kPanelBlocks, blocks_total - block0)));
        }
        finish();
      });
}

// The fused epilogue of one tile: out[row][col] = S(act(acc * row_scale * weight_scale + bias)),
// acc being the tile's int32 sums less the weight compensation (W8A8) or its fp32 sums
// (weight-only), [rows][kPanelCols], act the activation (in fp32, before the cast).
struct Epilogue {
  c10::ScalarType dtype;
  const int32_t* compensation;  // nullptr: none (signed activations, or float sums)
  const float* row_scales;      // nullptr: 1
  const float* weight_scale;    // [n]
  const void* bias;             // nullptr or [n] of the output dtype
  void* out;                    // [rows, n]
  int64_t n;
  Activation activation;
};

struct TileEpilogue {
  const Epilogue* e;
  const int32_t* int_sums;  // one of these two is set
  const float* float_sums;
  int64_t row0;
  int rows;
  int64_t col0;
};

struct WriteTile {
  template <typename S>
  FASTOPT_INLINE static void run(const TileEpilogue& t) {
    t.e->activation == Activation::kGelu ? sums<S, Activation::kGelu>(t)
                                         : sums<S, Activation::kNone>(t);
  }

  template <typename S, Activation A>
  FASTOPT_INLINE static void sums(const TileEpilogue& t) {
    if (t.int_sums == nullptr) return write<S, A, false>(t, t.float_sums);
    t.e->compensation != nullptr ? write<S, A, true>(t, t.int_sums)
                                 : write<S, A, false>(t, t.int_sums);
  }

  template <typename S, Activation A, bool COMPENSATE, typename Acc>
  FASTOPT_INLINE static void write(const TileEpilogue& t, const Acc* acc) {
    const Epilogue& e = *t.e;
    const int64_t cols = std::min<int64_t>(kPanelCols, e.n - t.col0);
    const int32_t* compensation = COMPENSATE ? e.compensation + t.col0 : nullptr;
    const float* weight_scale = e.weight_scale + t.col0;
    const S* bias = e.bias == nullptr ? nullptr : static_cast<const S*>(e.bias) + t.col0;
    for (int r = 0; r < t.rows; ++r) {
      const float row_scale = e.row_scales == nullptr ? 1.0f : e.row_scales[t.row0 + r];
      const Acc* sums = acc + r * kPanelCols;
      S* out = static_cast<S*>(e.out) + (t.row0 + r) * e.n + t.col0;
      const auto sum = [&](int64_t j) {
        if constexpr (COMPENSATE) return float(sums[j] - compensation[j]);
        return float(sums[j]);
      };
      if (bias == nullptr) {
        for (int64_t j = 0; j < cols; ++j) {
          out[j] = S(activate<A>(sum(j) * row_scale * weight_scale[j]));
        }
      } else {
        for (int64_t j = 0; j < cols; ++j) {
          out[j] = S(activate<A>(sum(j) * row_scale * weight_scale[j] + float(bias[j])));
        }
      }
    }
  }
};

FASTOPT_INLINE void write_tile_body(const TileEpilogue& t) {
  switch_param_dtype<WriteTile>(t.e->dtype, t);
}

FASTOPT_DISPATCH_BY_ISA(write_tile, write_tile_body, TileEpilogue)

// Runs the integer GEMM of `a` (staged by the caller) with the packed weight and hands each
// tile's int32 sums to finish(row0, rows, col0, sums); where the kernels read activations offset
// to unsigned, those sums still hold the weight compensation, which `finish` subtracts.
template <typename FinishFn>
void run_gemm(const Int8Kernels& kernels, const at::Tensor& a, const at::Tensor& packed,
              const FinishFn& finish) {
  const int64_t rows = a.size(0), lda = a.size(1);
  const int64_t padded_k = packed.size(1) * kGroupK;
  const int64_t groups = packed.size(1);
  const uint8_t* a_data = a.const_data_ptr<uint8_t>();
  const int8_t* b_data = packed.const_data_ptr<int8_t>();
  for_each_tile_in_parallel(
      rows, packed.size(0), padded_k, kernels.start_gemm, kernels.finish_gemm,
      [&](int64_t row0, int tile_rows, int64_t block0, int blocks) {
        alignas(64) int32_t sums[kTileRows * kPanelCols];
        kernels.gemm(GemmTile{a_data + row0 * lda, lda, b_data + block0 * groups * kGroupBytes,
                              groups * kGroupBytes, groups, tile_rows, blocks, sums});
        finish(row0, tile_rows, block0 * kBlockN, sums);
      });
}

at::Tensor int8_mm_cpu(const at::Tensor& input, const at::Tensor& packed_weight,
                       const at::Tensor& weight_compensation, int64_t in_features) {
  constexpr const char* op = "fastopt.int8_mm";
  require(input.scalar_type() == at::kChar && input.dim() == 2, op,
          "input must be a 2-d int8 tensor");
  check_packed_weight(op, input, packed_weight, weight_compensation, in_features);
  const Int8Kernels& kernels = active_int8_kernels();
  const int64_t rows = input.size(0), k = input.size(1), n = weight_compensation.size(0);
  const int64_t padded_k = packed_weight.size(1) * kGroupK;
  at::Tensor out = at::empty({rows, n}, input.options().dtype(at::kInt));
  if (rows == 0 || n == 0) return out;
  if (k == 0) return out.zero_();  // an empty sum
  // The tiles read rows padded to whole groups, offset to uint8 for the VNNI kernels.
  at::Tensor a = at::zeros({rows, padded_k + kActivationRowPad}, input.options().dtype(at::kByte));
  const at::Tensor in_c = input.contiguous();
  const int8_t* in = in_c.const_data_ptr<int8_t>();
  uint8_t* staged = a.mutable_data_ptr<uint8_t>();
  const int64_t lda = a.size(1);
  const int offset = kernels.unsigned_activations ? 128 : 0;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t j = 0; j < padded_k; ++j) {
      staged[m * lda + j] = uint8_t((j < k ? in[m * k + j] : 0) + offset);
    }
  }
  int32_t* out_data = out.mutable_data_ptr<int32_t>();
  const int32_t* comp = weight_compensation.const_data_ptr<int32_t>();
  run_gemm(kernels, a, packed_weight,
           [&](int64_t row0, int tile_rows, int64_t col0, const int32_t* sums) {
             const int64_t cols = std::min<int64_t>(kPanelCols, n - col0);
             for (int r = 0; r < tile_rows; ++r) {
               int32_t* out_row = out_data + (row0 + r) * n + col0;
               for (int64_t j = 0; j < cols; ++j) {
                 out_row[j] =
                     sums[r * kPanelCols + j] - (kernels.unsigned_activations ? comp[col0 + j] : 0);
               }
             }
           });
  return out;
}

at::Tensor int8_linear_cpu(const at::Tensor& input, const at::Tensor& packed_weight,
                           const at::Tensor& weight_compensation, int64_t in_features,
                           const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& input_scale, bool quantize_input,
                           c10::string_view activation_name) {
  check_linear_args(input, packed_weight, weight_compensation, in_features, weight_scale, bias,
                    input_scale);
  const Activation activation = activation_from_name("fastopt.int8_linear", activation_name);
  if (input.scalar_type() == at::kDouble) {
    return int8_linear_fp64(input, packed_weight, weight_compensation, in_features, weight_scale,
                            bias, input_scale, quantize_input, activation);
  }
  const int64_t k = input.size(-1), n = weight_compensation.size(0);
  // An explicit row count: reshape({-1, 0}) cannot infer it when K == 0.
  const int64_t rows = c10::multiply_integers(input.sizes().begin(), input.sizes().end() - 1);
  const at::Tensor x = input.reshape({rows, k}).contiguous();
  const int64_t padded_k = packed_weight.size(1) * kGroupK;
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty({rows, n}, input.options());
  if (rows == 0 || n == 0) return out.view(out_shape);
  if (k == 0) {  // no input features, as nn.Linear: act(the bias), or act(0) = 0
    if (bias.has_value()) {
      out.copy_(bias->unsqueeze(0).expand({rows, n}));
      if (activation == Activation::kGelu) out = at::gelu(out);
    } else {
      out.zero_();
    }
    return out.view(out_shape);
  }

  const Int8Kernels& kernels = active_int8_kernels();
  const at::Tensor scale_c = weight_scale.contiguous();
  // Undefined tensors stand for absent options.
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor input_scale_c =
      input_scale.has_value() ? input_scale->contiguous() : at::Tensor();
  const float* smoothing =
      input_scale_c.defined() ? input_scale_c.const_data_ptr<float>() : nullptr;
  Epilogue epilogue{input.scalar_type(),
                    nullptr,
                    nullptr,
                    scale_c.const_data_ptr<float>(),
                    bias_c.defined() ? bias_c.const_data_ptr() : nullptr,
                    out.mutable_data_ptr(),
                    n,
                    activation};
  StageArgs stage{};
  if (quantize_input) {
    at::Tensor a =
        at::empty({rows, padded_k + kActivationRowPad}, input.options().dtype(at::kByte));
    at::Tensor row_scales = at::empty({rows}, input.options().dtype(at::kFloat));
    stage.quantized = a.mutable_data_ptr<uint8_t>();
    stage.row_stride = a.size(1);
    stage.row_scales = row_scales.mutable_data_ptr<float>();
    stage.unsigned_activations = kernels.unsigned_activations;
    stage_rows_in_parallel(x, smoothing, padded_k, stage, /*quantize=*/true);
    epilogue.row_scales = stage.row_scales;
    if (kernels.unsigned_activations) {
      epilogue.compensation = weight_compensation.const_data_ptr<int32_t>();
    }
    run_gemm(kernels, a, packed_weight,
             [&](int64_t row0, int tile_rows, int64_t col0, const int32_t* sums) {
               write_tile(TileEpilogue{&epilogue, sums, nullptr, row0, tile_rows, col0});
             });
  } else {
    at::Tensor widened =
        at::empty({rows, padded_k + kActivationRowPad}, input.options().dtype(at::kFloat));
    stage.widened = widened.mutable_data_ptr<float>();
    stage.row_stride = widened.size(1);
    stage_rows_in_parallel(x, smoothing, padded_k, stage, /*quantize=*/false);
    const int64_t groups = packed_weight.size(1);
    const int8_t* b_data = packed_weight.const_data_ptr<int8_t>();
    for_each_tile_in_parallel(
        rows, packed_weight.size(0), padded_k, [] {}, [] {},
        [&](int64_t row0, int tile_rows, int64_t block0, int blocks) {
          alignas(64) float acc[kTileRows * kPanelCols];
          kernels.weight_only(WeightOnlyTile{
              stage.widened + row0 * stage.row_stride, stage.row_stride,
              b_data + block0 * groups * kGroupBytes, groups, tile_rows, blocks, acc});
          write_tile(TileEpilogue{&epilogue, nullptr, acc, row0, tile_rows, block0 * kBlockN});
        });
  }
  return out.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("int8_mm", &int8_mm_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
}

}  // namespace fastopt::cpu::int8
