// fastopt::traffic_probe_: the roofline the optimizer kernels are measured against. It reads
// every `updated` and `read` tensor once and writes every `updated` one once (an fp32 Adam step
// is 3 updated + 1 read, plain RMSprop or Adagrad 2 + 1) with fused multiply-adds only, through
// the same thread pool, loop and per-instruction-set compilation as the kernels, so its speed is
// the most a one-pass optimizer step with that traffic can reach here.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
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
  int64_t begin;
  int64_t end;
};

template <int UPDATED, int READ>
struct ProbeLoop {
  template <size_t... U, size_t... R>
  FASTOPT_INLINE static void run(const ProbePiece& a, std::index_sequence<U...>,
                                 std::index_sequence<R...>) {
    const auto element = [&](int64_t i) FASTOPT_INLINE_LAMBDA {
      const float read_sum = (a.read[R][i] + ...);
      ((a.updated[U][i] = a.updated[U][i] * 0.9f + read_sum), ...);
    };
    prefetched_loop(a.begin, a.end, element, a.updated[U]..., a.read[R]...);
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
  for_each_piece_in_parallel({numel}, [&](size_t, int64_t begin, int64_t end) {
    ProbePiece share = piece;
    share.begin = begin;
    share.end = end;
    probe_piece(share);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("traffic_probe_", &traffic_probe_cpu);
}

}  // namespace fastopt::cpu
