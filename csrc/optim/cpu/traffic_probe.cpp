// fastopt::traffic_probe_: the roofline the optimizer kernels are measured against. It reads
// every `updated` and `read` tensor once and writes every `updated` one once (an fp32 Adam step
// is 3 updated + 1 read, plain RMSprop or Adagrad 2 + 1) with fused multiply-adds only, through
// the same thread pool and per-instruction-set compilation as the kernels, so its speed is the
// most a one-pass optimizer step with that traffic can reach here.
//
// Two things keep it an upper bound rather than one loop's speed:
// - It writes back the values it read (u * 1 + r * 0, the factors unknown to the compiler), so it
//   can run on a step's own tensors, in the cache state the step finds them in: a step timed right
//   after another one on the same tensors can find part of them in a large last-level cache, which
//   a probe on tensors of its own does not.
// - The two loop forms of the kernels (hardware prefetching only, as torch's loops; or explicit
//   prefetches ahead, prefetched_loop.h) are each faster on some machines; the probe times both
//   on its first call for a stream count and keeps the faster.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <utility>

#include "common/macros.h"
#include "cpu/isa.h"
#include "optim/cpu/multi_tensor.h"
#include "optim/cpu/prefetched_loop.h"

namespace fastopt::cpu {
namespace {

constexpr int kMaxUpdated = 4;
constexpr int kMaxRead = 2;

struct ProbePiece {
  std::array<float*, kMaxUpdated> updated;
  std::array<const float*, kMaxRead> read;
  int n_updated;
  int n_read;
  bool prefetch;  // the loop form: prefetched_loop, or a plain loop
  float keep;     // 1
  float add;      // 0
  int64_t begin;
  int64_t end;
};

template <int UPDATED, int READ>
struct ProbeLoop {
  template <size_t... U, size_t... R>
  FASTOPT_INLINE static void run(const ProbePiece& a, std::index_sequence<U...>,
                                 std::index_sequence<R...>) {
    // Runtime factors 1 and 0: the compiler cannot drop the arithmetic or the stores.
    const float keep = a.keep, add = a.add;
    const auto element = [&](int64_t i) FASTOPT_INLINE_LAMBDA {
      const float read_sum = (a.read[R][i] + ...);
      ((a.updated[U][i] = a.updated[U][i] * keep + read_sum * add), ...);
    };
    if (a.prefetch) {
      prefetched_loop(a.begin, a.end, element, a.updated[U]..., a.read[R]...);
    } else {
      for (int64_t i = a.begin; i < a.end; ++i) element(i);
    }
  }

  FASTOPT_INLINE static void run(const ProbePiece& a) {
    run(a, std::make_index_sequence<UPDATED>(), std::make_index_sequence<READ>());
  }
};

// Turns the run-time stream counts into template arguments.
template <int UPDATED = 1, int READ = 1>
FASTOPT_INLINE void probe_body(const ProbePiece& a) {
  if constexpr (UPDATED <= kMaxUpdated && READ <= kMaxRead) {
    if (a.n_updated != UPDATED) return probe_body<UPDATED + 1, READ>(a);
    if (a.n_read != READ) return probe_body<UPDATED, READ + 1>(a);
    ProbeLoop<UPDATED, READ>::run(a);
  }
}

FASTOPT_DISPATCH_BY_ISA(probe_piece, probe_body<>, ProbePiece)

void traffic_probe_cpu(at::TensorList updated, at::TensorList read) {
  TORCH_CHECK(!updated.empty() && int(updated.size()) <= kMaxUpdated && !read.empty() &&
                  int(read.size()) <= kMaxRead,
              "fastopt::traffic_probe_: takes 1 to ", kMaxUpdated, " updated and 1 to ", kMaxRead,
              " read tensors");
  const int64_t numel = updated[0].numel();
  ProbePiece piece{};
  piece.n_updated = int(updated.size());
  piece.n_read = int(read.size());
  for (size_t i = 0; i < updated.size() + read.size(); ++i) {
    const at::Tensor& t = i < updated.size() ? updated[i] : read[i - updated.size()];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                    t.numel() == numel,
                "fastopt::traffic_probe_: expects contiguous float32 CPU tensors of one size");
    if (i < updated.size()) {
      piece.updated[i] = t.data_ptr<float>();
    } else {
      piece.read[i - updated.size()] = t.const_data_ptr<float>();
    }
  }
  piece.keep = 1.0f;
  piece.add = 0.0f;
  const auto run = [&](bool prefetch) {
    piece.prefetch = prefetch;
    for_each_piece_in_parallel({numel}, [&](size_t, int64_t begin, int64_t end) {
      ProbePiece share = piece;
      share.begin = begin;
      share.end = end;
      probe_piece(share);
    });
  };
  // The faster loop form for this stream count: 0 not yet timed, 1 plain, 2 prefetched.
  static std::array<std::array<std::atomic<int>, kMaxRead + 1>, kMaxUpdated + 1> faster_form{};
  std::atomic<int>& form = faster_form[piece.n_updated][piece.n_read];
  if (form.load() == 0) {
    // Best of two runs of each form, on these tensors, so both see the same cache state.
    double best[2] = {1e300, 1e300};
    for (int round = 0; round < 2; ++round) {
      for (int prefetch = 0; prefetch < 2; ++prefetch) {
        const auto start = std::chrono::steady_clock::now();
        run(prefetch);
        const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
        best[prefetch] = std::min(best[prefetch], took.count());
      }
    }
    form.store(best[1] < best[0] ? 2 : 1);
  }
  run(form.load() == 2);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("traffic_probe_", &traffic_probe_cpu);
}

}  // namespace fastopt::cpu
