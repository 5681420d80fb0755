// fastopt::adam_traffic_probe_: the roofline the Adam kernel is measured against. It moves
// exactly the bytes of an fp32 Adam step (param, grad, exp_avg, exp_avg_sq read; param, exp_avg,
// exp_avg_sq written) with fused multiply-adds only, through the same thread pool and the same
// per-instruction-set compilation, so its speed is the most a one-pass Adam can reach here.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>

#include "common/macros.h"
#include "cpu/isa.h"
#include "cpu/multi_tensor.h"
#include "cpu/prefetched_loop.h"

namespace fastopt::cpu {
namespace {

struct ProbePiece {
  float* param;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t begin;
  int64_t end;
};

FASTOPT_INLINE void probe_body(const ProbePiece& a) {
  float* __restrict__ param = a.param;
  const float* __restrict__ grad = a.grad;
  float* __restrict__ exp_avg = a.exp_avg;
  float* __restrict__ exp_avg_sq = a.exp_avg_sq;
  const auto element = [&](int64_t i) FASTOPT_INLINE_LAMBDA {
    const float g = grad[i];
    const float m = exp_avg[i] * 0.9f + g;
    const float v = exp_avg_sq[i] * 0.999f + g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = param[i] + m * -1e-3f + v * 1e-6f;
  };
  // The same loop as the optimizer kernels', prefetches included, so that the probe is the
  // roofline of that loop rather than of a plainer one.
  prefetched_loop(a.begin, a.end, element, param, grad, exp_avg, exp_avg_sq);
}

FASTOPT_DISPATCH_BY_ISA(probe_piece, probe_body, ProbePiece)

void adam_traffic_probe_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                            at::Tensor& exp_avg_sq) {
  const std::array<const at::Tensor*, 4> tensors{&param, &grad, &exp_avg, &exp_avg_sq};
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(
        t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == param.numel(),
        "fastopt::adam_traffic_probe_: expects four contiguous float32 tensors of one size");
  }
  for_each_piece_in_parallel({param.numel()}, [&](size_t, int64_t begin, int64_t end) {
    probe_piece(ProbePiece{param.data_ptr<float>(), grad.const_data_ptr<float>(),
                           exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), begin, end});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("adam_traffic_probe_", &adam_traffic_probe_cpu);
}

}  // namespace fastopt::cpu
