// fastopt::traffic_probe_: the roofline the optimizer kernels are measured against. It reads
// every `updated` and `read` tensor once and writes every `updated` one once (an fp32 Adam step
// is 3 updated + 1 read, plain RMSprop or Adagrad 2 + 1) with fused multiply-adds only, through
// the same thread pool and per-instruction-set compilation as the kernels, so its speed is the
// most a one-pass optimizer step with that traffic can reach here.
//
// Streams are float32 or bfloat16 (a 16-bit stream of any kind moves the bytes of a bfloat16
// one), so a step that keeps some of its tensors in 16 bits (bfloat16 params, state or
// remainders) is measured against a probe with its own streams, each read and written at its
// own width, rather than against float32 streams scaled to its bytes: reads and writes need not
// cost the same, and a mode's mix of them is its own. bfloat16 values go through float32 and back
// by truncation (exact for a value that came from bfloat16, and the cheapest conversion: the
// probe's arithmetic must stay far below its memory time).
//
// With no updated stream it only reads (a step's streams passed as read ones: how fast this
// machine reads what a step reads, the least time of any pass over those bytes). It then adds up
// what it reads, in as many independent lanes as a vector holds (one running sum would be bound
// by the latency of its additions), and writes the sum into `total`, so that no read can be
// dropped; the plain and prefetched forms read as the updating ones do.
//
// Three things keep it an upper bound rather than one loop's speed:
// - It writes back the values it read (u * 1 + r * 0, the factors unknown to the compiler), so it
//   can run on a step's own tensors, in the cache state the step finds them in: a step timed right
//   after another one on the same tensors can find part of them in a large last-level cache, which
//   a probe on tensors of its own does not.
// - It takes many tensors per stream, as a step does, and splits them into pieces with the step's
//   own partition (multi_tensor.h), so a step over thousands of small tensors is measured against
//   a probe that pays the same per-tensor costs, not against one long stream.
// - The two loop forms of the kernels (hardware prefetching only, as torch's loops; or explicit
//   prefetches ahead, prefetched_loop.h) are each faster on some machines and sizes; the caller
//   runs both (`prefetch`) and keeps the faster.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <utility>
#include <vector>

#include "common/macros.h"
#include "cpu/isa.h"
#include "optim/cpu/multi_tensor.h"
#include "optim/cpu/prefetched_loop.h"
#include "optim/step_storage.h"

namespace fastopt::cpu {
namespace {

constexpr int kMaxUpdated = 4;  // streams, float32 and bfloat16 together
constexpr int kMaxRead = 4;
// A step reads one stream only (its grads), so one bfloat16 read stream is all a step's probe
// needs; the limit keeps the number of compiled loops down.
constexpr int kMaxBf16Read = 1;
constexpr int kSumLanes = 16;  // a 512-bit vector of float32

using c10::BFloat16;

FASTOPT_INLINE BFloat16 truncated(float v) {
  return BFloat16(uint16_t(float_bits(v) >> 16), BFloat16::from_bits());
}

struct ProbePiece {
  std::array<float*, kMaxUpdated> updated;
  std::array<BFloat16*, kMaxUpdated> updated_bf16;
  std::array<const float*, kMaxRead> read;
  std::array<const BFloat16*, kMaxRead> read_bf16;
  int n_updated;  // of each kind
  int n_updated_bf16;
  int n_read;
  int n_read_bf16;
  bool prefetch;  // the loop form: prefetched_loop, or a plain loop
  float keep;     // 1
  float add;      // 0
  float* sum;     // with no updated stream: where the piece adds the sum of what it read
  int64_t begin;
  int64_t end;
};

// U float32 and UB bfloat16 updated streams, R float32 and RB bfloat16 read ones.
template <int U, int UB, int R, int RB>
struct ProbeLoop {
  FASTOPT_INLINE static void run(const ProbePiece& a) {
    if constexpr (U + UB == 0) {
      read_only(a);
    } else {
      update(a, std::make_index_sequence<U>(), std::make_index_sequence<UB>());
    }
  }

  FASTOPT_INLINE static float read_sum(const ProbePiece& a, int64_t i) {
    return read_sum(a, i, std::make_index_sequence<R>(), std::make_index_sequence<RB>());
  }

  template <size_t... R32, size_t... R16>
  FASTOPT_INLINE static float read_sum(const ProbePiece& a, int64_t i, std::index_sequence<R32...>,
                                       std::index_sequence<R16...>) {
    // No `0.0f +` for an empty pack: float32 streams alone keep the loop they had before
    // bfloat16 ones were taken (the optimizer table's roofline).
    if constexpr (sizeof...(R16) == 0) {
      return (a.read[R32][i] + ...);
    } else if constexpr (sizeof...(R32) == 0) {
      return (float(a.read_bf16[R16][i]) + ...);
    } else {
      return (a.read[R32][i] + ...) + (float(a.read_bf16[R16][i]) + ...);
    }
  }

  template <size_t... U32, size_t... U16>
  FASTOPT_INLINE static void update(const ProbePiece& a, std::index_sequence<U32...>,
                                    std::index_sequence<U16...>) {
    // Runtime factors 1 and 0: the compiler cannot drop the arithmetic or the stores.
    const float keep = a.keep, add = a.add;
    const auto element = [&](int64_t block, int32_t j) FASTOPT_INLINE_LAMBDA {
      const int64_t i = block + j;
      const float sum = read_sum(a, i);
      ((a.updated[U32][i] = a.updated[U32][i] * keep + sum * add), ...);
      ((a.updated_bf16[U16][i] = truncated(float(a.updated_bf16[U16][i]) * keep + sum * add)), ...);
    };
    if (a.prefetch) {
      prefetched(a, element, std::make_index_sequence<U>(), std::make_index_sequence<UB>(),
                 std::make_index_sequence<R>(), std::make_index_sequence<RB>());
    } else {
      for (int64_t i = a.begin; i < a.end; ++i) element(i, 0);
    }
  }

  // prefetched_loop over every stream, each pack of indices from its own sequence.
  template <typename Element, size_t... U32, size_t... U16, size_t... R32, size_t... R16>
  FASTOPT_INLINE static void prefetched(const ProbePiece& a, const Element& element,
                                        std::index_sequence<U32...>, std::index_sequence<U16...>,
                                        std::index_sequence<R32...>, std::index_sequence<R16...>) {
    prefetched_loop(a.begin, a.end, element, a.updated[U32]..., a.updated_bf16[U16]...,
                    a.read[R32]..., a.read_bf16[R16]...);
  }

  // Reads in prefetched_loop's blocks, with its prefetches ahead or without.
  FASTOPT_INLINE static void read_only(const ProbePiece& a) {
    float lanes[kSumLanes] = {};
    int64_t i = a.begin;
    for (; i + kPrefetchBlock <= a.end; i += kPrefetchBlock) {
      if (a.prefetch) {
        for (int s = 0; s < R; ++s) prefetch_block_ahead(a.read[s], i);
        for (int s = 0; s < RB; ++s) prefetch_block_ahead(a.read_bf16[s], i);
      }
      for (int64_t k = i; k < i + kPrefetchBlock; k += kSumLanes) {
        for (int j = 0; j < kSumLanes; ++j) lanes[j] += read_sum(a, k + j);
      }
    }
    for (; i < a.end; ++i) lanes[0] += read_sum(a, i);
    float sum = 0.0f;
    for (float lane : lanes) sum += lane;
    *a.sum += sum;
  }
};

// Turns the run-time stream counts into template arguments.
template <int U = 0, int UB = 0, int R = 0, int RB = 0>
FASTOPT_INLINE void probe_body(const ProbePiece& a) {
  if constexpr (U + UB <= kMaxUpdated && R + RB <= kMaxRead && RB <= kMaxBf16Read) {
    if (a.n_updated != U) return probe_body<U + 1, UB, R, RB>(a);
    if (a.n_updated_bf16 != UB) return probe_body<U, UB + 1, R, RB>(a);
    if (a.n_read != R) return probe_body<U, UB, R + 1, RB>(a);
    if (a.n_read_bf16 != RB) return probe_body<U, UB, R, RB + 1>(a);
    if constexpr (R + RB >= 1) ProbeLoop<U, UB, R, RB>::run(a);
  }
}

FASTOPT_DISPATCH_BY_ISA(probe_piece, probe_body<>, ProbePiece)

// `updated` holds kMaxUpdated streams at most, each of `tensors` tensors (stream s's tensor i at
// s * tensors + i); `read` likewise. Tensor i has one size in every stream; each tensor is float32
// or bfloat16. With no updated stream, `total` (one float32 element) receives the sum of
// everything read.
void traffic_probe_cpu(at::TensorList updated, at::TensorList read, int64_t tensors, bool prefetch,
                       const std::optional<at::Tensor>& total) {
  TORCH_CHECK(tensors >= 1 && updated.size() % tensors == 0 && read.size() % tensors == 0,
              "fastopt::traffic_probe_: updated and read must hold `tensors` (", tensors,
              ") tensors per stream, got ", updated.size(), " and ", read.size());
  const int n_updated = int(updated.size() / tensors);
  const int n_read = int(read.size() / tensors);
  TORCH_CHECK(n_updated <= kMaxUpdated && n_read >= 1 && n_read <= kMaxRead,
              "fastopt::traffic_probe_: takes 0 (to only read) or 1 to ", kMaxUpdated,
              " updated and 1 to ", kMaxRead, " read streams");
  TORCH_CHECK((n_updated == 0) == total.has_value(),
              "fastopt::traffic_probe_: pass `total` (it receives the sum of what is read) if and "
              "only if there is no updated stream");
  if (total.has_value()) {
    TORCH_CHECK(
        total->device().is_cpu() && total->scalar_type() == at::kFloat && total->numel() == 1,
        "fastopt::traffic_probe_: total must be a one-element float32 CPU tensor");
  }
  std::vector<int64_t> numels(tensors);
  std::vector<ProbePiece> pieces(tensors);
  for (int64_t i = 0; i < tensors; ++i) {
    ProbePiece& piece = pieces[i];
    piece = ProbePiece{};
    piece.prefetch = prefetch;
    piece.keep = 1.0f;
    piece.add = 0.0f;
    numels[i] = read[i].numel();
    for (int s = 0; s < n_updated + n_read; ++s) {
      const bool is_updated = s < n_updated;
      const at::Tensor& t =
          is_updated ? updated[s * tensors + i] : read[(s - n_updated) * tensors + i];
      const bool is_bf16 = t.scalar_type() == at::kBFloat16;
      TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || is_bf16) &&
                      t.is_contiguous() && t.numel() == numels[i],
                  "fastopt::traffic_probe_: expects contiguous float32 or bfloat16 CPU tensors, "
                  "tensor ",
                  i, " of one size in every stream");
      if (is_updated && is_bf16) {
        piece.updated_bf16[piece.n_updated_bf16++] = t.data_ptr<BFloat16>();
      } else if (is_updated) {
        piece.updated[piece.n_updated++] = t.data_ptr<float>();
      } else if (is_bf16) {
        TORCH_CHECK(piece.n_read_bf16 < kMaxBf16Read, "fastopt::traffic_probe_: takes at most ",
                    kMaxBf16Read, " bfloat16 read stream (a step's grads); tensor ", i,
                    " has more: pass the others as float32");
        piece.read_bf16[piece.n_read_bf16++] = t.const_data_ptr<BFloat16>();
      } else {
        piece.read[piece.n_read++] = t.const_data_ptr<float>();
      }
    }
  }
  std::vector<float> sums(at::get_num_threads(), 0.0f);  // one per thread
  for_each_piece_in_parallel(numels, [&](size_t t, int64_t begin, int64_t end) {
    ProbePiece share = pieces[t];
    share.begin = begin;
    share.end = end;
    share.sum = &sums[at::get_thread_num()];
    probe_piece(share);
  });
  if (total.has_value()) {
    float sum = 0.0f;
    for (float s : sums) sum += s;
    *total->data_ptr<float>() = sum;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("traffic_probe_", &traffic_probe_cpu);
}

}  // namespace fastopt::cpu
