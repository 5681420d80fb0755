// fastopt::traffic_probe_: the roofline the optimizer kernels are measured against. It reads
// every `updated` and `read` tensor once and writes every `updated` one once (an fp32 Adam step
// is 3 updated + 1 read, plain RMSprop or Adagrad 2 + 1) with fused multiply-adds only, through
// the same thread pool and per-instruction-set compilation as the kernels, so its speed is the
// most a one-pass optimizer step with that traffic can reach here.
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
#include <torch/library.h>

#include <array>
#include <optional>
#include <utility>
#include <vector>

#include "common/macros.h"
#include "cpu/isa.h"
#include "optim/cpu/multi_tensor.h"
#include "optim/cpu/prefetched_loop.h"

namespace fastopt::cpu {
namespace {

constexpr int kMaxUpdated = 4;
constexpr int kMaxRead = 4;
constexpr int kSumLanes = 16;  // a 512-bit vector of float32

struct ProbePiece {
  std::array<float*, kMaxUpdated> updated;
  std::array<const float*, kMaxRead> read;
  int n_updated;
  int n_read;
  bool prefetch;  // the loop form: prefetched_loop, or a plain loop
  float keep;     // 1
  float add;      // 0
  float* sum;     // with no updated stream: where the piece adds the sum of what it read
  int64_t begin;
  int64_t end;
};

template <int UPDATED, int READ>
struct ProbeLoop {
  FASTOPT_INLINE static void run(const ProbePiece& a) {
    if constexpr (UPDATED == 0) {
      read_only(a, std::make_index_sequence<READ>());
    } else {
      update(a, std::make_index_sequence<UPDATED>(), std::make_index_sequence<READ>());
    }
  }

  template <size_t... U, size_t... R>
  FASTOPT_INLINE static void update(const ProbePiece& a, std::index_sequence<U...>,
                                    std::index_sequence<R...>) {
    // Runtime factors 1 and 0: the compiler cannot drop the arithmetic or the stores.
    const float keep = a.keep, add = a.add;
    const auto element = [&](int64_t block, int32_t j) FASTOPT_INLINE_LAMBDA {
      const int64_t i = block + j;
      const float read_sum = (a.read[R][i] + ...);
      ((a.updated[U][i] = a.updated[U][i] * keep + read_sum * add), ...);
    };
    if (a.prefetch) {
      prefetched_loop(a.begin, a.end, element, a.updated[U]..., a.read[R]...);
    } else {
      for (int64_t i = a.begin; i < a.end; ++i) element(i, 0);
    }
  }

  // Reads in prefetched_loop's blocks, with its prefetches ahead or without.
  template <size_t... R>
  FASTOPT_INLINE static void read_only(const ProbePiece& a, std::index_sequence<R...>) {
    float lanes[kSumLanes] = {};
    int64_t i = a.begin;
    for (; i + kPrefetchBlock <= a.end; i += kPrefetchBlock) {
      if (a.prefetch) (prefetch_block_ahead(a.read[R], i), ...);
      for (int64_t k = i; k < i + kPrefetchBlock; k += kSumLanes) {
        for (int j = 0; j < kSumLanes; ++j) lanes[j] += (a.read[R][k + j] + ...);
      }
    }
    for (; i < a.end; ++i) lanes[0] += (a.read[R][i] + ...);
    float sum = 0.0f;
    for (float lane : lanes) sum += lane;
    *a.sum += sum;
  }
};

// Turns the run-time stream counts into template arguments.
template <int UPDATED = 0, int READ = 1>
FASTOPT_INLINE void probe_body(const ProbePiece& a) {
  if constexpr (UPDATED <= kMaxUpdated && READ <= kMaxRead) {
    if (a.n_updated != UPDATED) return probe_body<UPDATED + 1, READ>(a);
    if (a.n_read != READ) return probe_body<UPDATED, READ + 1>(a);
    ProbeLoop<UPDATED, READ>::run(a);
  }
}

FASTOPT_DISPATCH_BY_ISA(probe_piece, probe_body<>, ProbePiece)

// `updated` holds kMaxUpdated streams at most, each of `tensors` tensors (stream s's tensor i at
// s * tensors + i); `read` likewise. Tensor i has one size in every stream. With no updated
// stream, `total` (one float32 element) receives the sum of everything read.
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
    piece.n_updated = n_updated;
    piece.n_read = n_read;
    piece.prefetch = prefetch;
    piece.keep = 1.0f;
    piece.add = 0.0f;
    numels[i] = read[i].numel();
    for (int s = 0; s < n_updated + n_read; ++s) {
      const at::Tensor& t =
          s < n_updated ? updated[s * tensors + i] : read[(s - n_updated) * tensors + i];
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                      t.numel() == numels[i],
                  "fastopt::traffic_probe_: expects contiguous float32 CPU tensors, tensor ", i,
                  " of one size in every stream");
      if (s < n_updated) {
        piece.updated[s] = t.data_ptr<float>();
      } else {
        piece.read[s - n_updated] = t.const_data_ptr<float>();
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
