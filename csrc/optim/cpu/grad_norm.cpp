// fastopt::grad_norm on the CPU: one pass over all tensors in one parallel region, the element
// loop compiled per instruction set.
//
// Each tensor is cut into blocks of kNormBlock elements, and each block's accumulated value is
// stored in its own slot; the slots are then combined pairwise, in block order. Which thread
// reads a block never changes how it is summed, so the result does not depend on the number of
// threads (nor, on one instruction set, on anything else).
//
// Accumulation is in float64. For the 1- and 2-norms with a float32 result (no float64 tensor in
// the call), each lane first sums runs of kFloatRun of its elements in float32 and adds the run
// into its float64 accumulator: converting every element to float64 would make the pass slower
// than memory. A run's sum is off by at most kFloatRun float32 roundings, so the result stays
// within a few roundings of the exact norm. A block is summed again with every element in
// float64 where the runs may have lost something: where a run overflowed (or an element is
// infinite or NaN), and where float32 underflow may matter (the block's largest magnitude is
// below 2^-50, so that its squares are below float32's normal range; above, what underflows is
// below 2^-37 of the sum).
#include "optim/grad_norm.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/macros.h"
#include "cpu/dtype_switch.h"
#include "cpu/isa.h"
#include "optim/cpu/multi_tensor.h"

namespace fastopt::cpu {
namespace {

constexpr int64_t kNormBlock = 4096;  // elements per slot
// Independent accumulators per block: enough to fill the vector units on every instruction set.
constexpr int kLanes = 32;
constexpr int kFloatRun = 8;  // elements a lane sums in float32 before adding them in float64
// The smallest largest magnitude of a block whose float32 runs are exact enough (see top).
constexpr float kFloatRunSmallest = 0x1p-50f;

// A range of whole blocks of one tensor, and where their slots are.
struct NormPiece {
  const void* data;  // the tensor's elements, in memory order (any dense layout)
  c10::ScalarType dtype;
  int64_t numel;
  int64_t first_block;
  int64_t end_block;
  double p;
  bool float_runs;  // may sum float32 runs (see top): the norm is float32
  double* slots;    // slot of block b: slots[b]
};

template <NormKind K>
FASTOPT_INLINE double combine_lanes(double (&lanes)[kLanes]) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) lanes[j] = NormMath<K>::combine(lanes[j], lanes[j + width]);
  }
  return lanes[0];
}

// The accumulated value of x[begin, end), every element added in float64.
template <NormKind K, typename S>
FASTOPT_INLINE double accumulate_in_double(const S* __restrict__ x, int64_t begin, int64_t end,
                                           double p) {
  double lanes[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] = NormMath<K>::add(lanes[j], double(x[i + j]), p);
  }
  for (int j = 0; i < end; ++i, ++j) lanes[j] = NormMath<K>::add(lanes[j], double(x[i]), p);
  return combine_lanes<K>(lanes);
}

// The accumulated value of x[begin, end) summed in float32 runs, if that is exact enough (see
// top); nullopt if the block must be summed in float64.
template <NormKind K, typename S>
FASTOPT_INLINE std::optional<double> accumulate_in_float_runs(const S* __restrict__ x,
                                                              int64_t begin, int64_t end) {
  double lanes[kLanes] = {};
  float largest[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes * kFloatRun <= end; i += kLanes * kFloatRun) {
    float runs[kLanes] = {};
    for (int r = 0; r < kFloatRun; ++r) {
      for (int j = 0; j < kLanes; ++j) {
        const float v = std::fabs(float(x[i + r * kLanes + j]));
        runs[j] += K == NormKind::kTwo ? v * v : v;
        largest[j] = std::max(largest[j], v);
      }
    }
    for (int j = 0; j < kLanes; ++j) lanes[j] += double(runs[j]);
  }
  for (int j = 0; i < end; ++i, j = (j + 1) % kLanes) {
    const float v = std::fabs(float(x[i]));
    lanes[j] = NormMath<K>::add(lanes[j], double(v), 0.0);
    largest[j] = std::max(largest[j], v);
  }
  const double accumulated = combine_lanes<K>(lanes);
  const float top = *std::max_element(largest, largest + kLanes);
  // A NaN element makes the sum NaN (std::max may skip it), an infinite one makes it infinite.
  if (!std::isfinite(accumulated)) return std::nullopt;
  if (top < kFloatRunSmallest && top != 0.0f) return std::nullopt;  // zero: every element is
  return accumulated;
}

template <NormKind K>
struct NormPieceLoop {
  template <typename S>
  FASTOPT_INLINE static void run(const NormPiece& a) {
    constexpr bool kFloatRuns =
        (K == NormKind::kTwo || K == NormKind::kOne) && !std::is_same_v<S, double>;
    const S* __restrict__ x = static_cast<const S*>(a.data);
    for (int64_t block = a.first_block; block < a.end_block; ++block) {
      const int64_t begin = block * kNormBlock;
      const int64_t end = std::min(a.numel, begin + kNormBlock);
      std::optional<double> accumulated;
      if constexpr (kFloatRuns) {
        if (a.float_runs) accumulated = accumulate_in_float_runs<K>(x, begin, end);
      }
      a.slots[block] =
          accumulated.has_value() ? *accumulated : accumulate_in_double<K>(x, begin, end, a.p);
    }
  }
};

template <NormKind K>
FASTOPT_INLINE void norm_piece_body(const NormPiece& a) {
  switch_param_dtype<NormPieceLoop<K>>(a.dtype, a);
}

// norm_piece_body<K> compiled for each instruction set, and `piece`, which runs the active one.
template <NormKind K>
struct NormPieces {
  FASTOPT_DISPATCH_BY_ISA(piece, norm_piece_body<K>, NormPiece)
};

// The slots combined pairwise: the rounding error grows with the log of their number.
template <NormKind K>
double combine_pairwise(const double* slots, int64_t n) {
  if (n == 1) return slots[0];
  const int64_t half = n / 2;
  return NormMath<K>::combine(combine_pairwise<K>(slots, half),
                              combine_pairwise<K>(slots + half, n - half));
}

template <NormKind K>
double accumulate_on_cpu(at::TensorList tensors, double p, bool float_runs) {
  const size_t n = tensors.size();
  std::vector<int64_t> blocks(n);
  std::vector<int64_t> first_slot(n + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    blocks[i] = (tensors[i].numel() + kNormBlock - 1) / kNormBlock;
    first_slot[i + 1] = first_slot[i] + blocks[i];
  }
  if (first_slot[n] == 0) return 0.0;
  std::vector<double> slots(first_slot[n]);
  const int64_t min_blocks_per_thread = (kMinElementsPerThread + kNormBlock - 1) / kNormBlock;
  for_each_piece_in_parallel(
      blocks,
      [&](size_t t, int64_t first_block, int64_t end_block) {
        NormPieces<K>::piece(NormPiece{tensors[t].const_data_ptr(), tensors[t].scalar_type(),
                                       tensors[t].numel(), first_block, end_block, p, float_runs,
                                       slots.data() + first_slot[t]});
      },
      min_blocks_per_thread);
  return combine_pairwise<K>(slots.data(), first_slot[n]);
}

at::Tensor grad_norm_cpu(at::TensorList tensors, double norm_type,
                         const std::optional<at::Tensor>& grad_scale) {
  const at::ScalarType dtype =
      check_grad_norm(tensors, norm_type, grad_scale, c10::DeviceType::CPU);
  double norm = switch_norm_kind(norm_type, [&](auto kind) {
    constexpr NormKind K = decltype(kind)::value;
    const bool float_runs = dtype == at::kFloat;
    return NormMath<K>::finish(accumulate_on_cpu<K>(tensors, norm_type, float_runs), norm_type);
  });
  if (grad_scale.has_value()) norm /= std::fabs(grad_scale->item<double>());
  return at::scalar_tensor(norm, at::TensorOptions().dtype(dtype));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("grad_norm", &grad_norm_cpu);
}

}  // namespace fastopt::cpu
