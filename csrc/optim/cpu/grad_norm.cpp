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
// below 2^-37 of the sum). A block's largest magnitude is looked for only where its sum is small
// enough for that magnitude to be below 2^-50, which decides every block as a search of all of
// them would, and leaves the element loop nothing to do but sum: the fewer instructions per
// element, the further ahead of its reads the core runs, and the closer they come to the memory's
// rate.
//
// A thread reads several blocks of its piece at once, a turn of each in turn, and asks for each
// block's cache lines ahead of its reads, as the optimizer steps do: one sequential stream per
// thread reads memory slower than the several streams an optimizer step reads, and the pass
// exists only to read. Each block keeps its own accumulators and takes its elements in the
// same order as when read alone, so its slot value does not depend on which blocks it is read
// with.
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
#include "optim/cpu/prefetched_loop.h"

namespace fastopt::cpu {
namespace {

constexpr int64_t kNormBlock = 4096;  // elements per slot
// Independent accumulators per block: enough to fill the vector units on every instruction set.
constexpr int kLanes = 32;
constexpr int kFloatRun = 8;  // elements a lane sums in float32 before adding them in float64
// The smallest largest magnitude of a block whose float32 runs are exact enough (see top).
constexpr float kFloatRunSmallest = 0x1p-50f;

// The most a block whose magnitudes are all below kFloatRunSmallest can accumulate in float32 runs
// for norm K (1 or 2): each term is at most the term of kFloatRunSmallest (a power of two, so
// exact), and a sum of n such terms at most n times it (rounding is monotonic and n times a power
// of two is exact for any n up to kNormBlock). A block that accumulated more has a magnitude of at
// least kFloatRunSmallest, and need not be searched for its largest one.
template <NormKind K>
constexpr double kBelowSmallestAtMost =
    double(kNormBlock) *
    (K == NormKind::kTwo ? double(kFloatRunSmallest) * kFloatRunSmallest : kFloatRunSmallest);

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

// Elements a block's accumulators take per turn: a whole number of float32 runs of every lane.
constexpr int64_t kTurn = kLanes * kFloatRun;
static_assert(kNormBlock % kTurn == 0, "only a tensor's last block may end in a partial turn");

// One block accumulated with every element added in float64, lane j taking the elements whose
// offset in the block is j modulo kLanes.
template <NormKind K>
struct DoubleLanes {
  double lanes[kLanes] = {};

  // Adds the kTurn elements at x.
  template <typename S>
  FASTOPT_INLINE void add_turn(const S* __restrict__ x, double p) {
    for (int r = 0; r < kFloatRun; ++r) {
      for (int j = 0; j < kLanes; ++j) {
        lanes[j] = NormMath<K>::add(lanes[j], double(x[r * kLanes + j]), p);
      }
    }
  }

  // The block's accumulated value, once its first `done` elements (whole turns) of `size` are in.
  template <typename S>
  FASTOPT_INLINE double finish(const S* __restrict__ block, int64_t done, int64_t size, double p) {
    int64_t i = done;
    for (; i + kLanes <= size; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        lanes[j] = NormMath<K>::add(lanes[j], double(block[i + j]), p);
      }
    }
    for (int j = 0; i < size; ++i, ++j) lanes[j] = NormMath<K>::add(lanes[j], double(block[i]), p);
    return combine_lanes<K>(lanes);
  }
};

// The accumulated value of the `size` elements at x, every element added in float64.
template <NormKind K, typename S>
FASTOPT_INLINE double accumulate_in_double(const S* __restrict__ x, int64_t size, double p) {
  DoubleLanes<K> block;
  int64_t done = 0;
  for (; done + kTurn <= size; done += kTurn) block.add_turn(x + done, p);
  return block.finish(x, done, size, p);
}

// One block accumulated in float32 runs (see top): in each turn, lane j sums its kFloatRun
// elements in float32 and adds the run in float64; the block is summed again in float64 where
// that is not exact enough.
template <NormKind K>
struct FloatRunLanes {
  double lanes[kLanes] = {};

  template <typename S>
  FASTOPT_INLINE void add_turn(const S* __restrict__ x, double) {
    float runs[kLanes] = {};
    for (int r = 0; r < kFloatRun; ++r) {
      for (int j = 0; j < kLanes; ++j) {
        const float v = float(x[r * kLanes + j]);
        runs[j] += K == NormKind::kTwo ? v * v : std::fabs(v);
      }
    }
    for (int j = 0; j < kLanes; ++j) lanes[j] += double(runs[j]);
  }

  template <typename S>
  FASTOPT_INLINE double finish(const S* __restrict__ block, int64_t done, int64_t size, double p) {
    for (int64_t i = done, j = 0; i < size; ++i, j = (j + 1) % kLanes) {
      lanes[j] = NormMath<K>::add(lanes[j], double(float(block[i])), 0.0);
    }
    const double accumulated = combine_lanes<K>(lanes);
    // Summed again where a run may have lost something (see top). A NaN element makes the sum NaN,
    // an infinite one makes it infinite; a largest magnitude of zero means every element is zero.
    if (!std::isfinite(accumulated)) return accumulate_in_double<K>(block, size, p);
    if (accumulated > kBelowSmallestAtMost<K>) return accumulated;
    float top = 0.0f;
    for (int64_t i = 0; i < size; ++i) top = std::max(top, std::fabs(float(block[i])));
    const bool exact = top >= kFloatRunSmallest || top == 0.0f;
    return exact ? accumulated : accumulate_in_double<K>(block, size, p);
  }
};

// Blocks a thread reads at once (see top): enough streams to read at the rate of a step's.
constexpr int kConcurrentBlocks = 4;

// Accumulates the `count` blocks blocks[0, count) of a piece together, a turn of each in turn,
// into their slots, each with its own `Lanes`.
template <typename Lanes, typename S>
FASTOPT_INLINE void accumulate_blocks_together(const NormPiece& a, const S* __restrict__ x,
                                               const int64_t (&blocks)[kConcurrentBlocks],
                                               int count) {
  Lanes lanes[kConcurrentBlocks];
  int64_t size[kConcurrentBlocks];
  int64_t common_turns = kNormBlock / kTurn;
  for (int k = 0; k < count; ++k) {
    size[k] = std::min(kNormBlock, a.numel - blocks[k] * kNormBlock);
    common_turns = std::min(common_turns, size[k] / kTurn);
  }
  for (int64_t turn = 0; turn < common_turns; ++turn) {
    for (int k = 0; k < count; ++k) {
      const int64_t begin = blocks[k] * kNormBlock + turn * kTurn;
      for (int64_t ahead = 0; ahead < kTurn; ahead += kPrefetchBlock) {
        prefetch_block_ahead(x, begin + ahead);
      }
      lanes[k].add_turn(x + begin, a.p);
    }
  }
  // Only the tensor's last block can be shorter than the others.
  for (int k = 0; k < count; ++k) {
    const S* block = x + blocks[k] * kNormBlock;
    int64_t done = common_turns * kTurn;
    for (; done + kTurn <= size[k]; done += kTurn) lanes[k].add_turn(block + done, a.p);
    a.slots[blocks[k]] = lanes[k].finish(block, done, size[k], a.p);
  }
}

// The piece's blocks cut into kConcurrentBlocks consecutive ranges of (up to) `per_range` blocks,
// read together: the first block of each range, then the second of each, and so on.
template <typename Lanes, typename S>
FASTOPT_INLINE void accumulate_piece(const NormPiece& a) {
  const S* __restrict__ x = static_cast<const S*>(a.data);
  const int64_t per_range =
      (a.end_block - a.first_block + kConcurrentBlocks - 1) / kConcurrentBlocks;
  for (int64_t step = 0; step < per_range; ++step) {
    int64_t blocks[kConcurrentBlocks];
    int count = 0;
    for (int k = 0; k < kConcurrentBlocks; ++k) {
      const int64_t block = a.first_block + k * per_range + step;
      if (block < a.end_block) blocks[count++] = block;
    }
    accumulate_blocks_together<Lanes>(a, x, blocks, count);
  }
}

template <NormKind K>
struct NormPieceLoop {
  template <typename S>
  FASTOPT_INLINE static void run(const NormPiece& a) {
    constexpr bool kFloatRuns =
        (K == NormKind::kTwo || K == NormKind::kOne) && !std::is_same_v<S, double>;
    if constexpr (kFloatRuns) {
      if (a.float_runs) return accumulate_piece<FloatRunLanes<K>, S>(a);
    }
    accumulate_piece<DoubleLanes<K>, S>(a);
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
