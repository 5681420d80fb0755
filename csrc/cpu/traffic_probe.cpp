// fastopt::adam_traffic_probe_: the roofline the Adam kernel is measured against. It moves
// exactly the bytes of an fp32 Adam step (param, grad, exp_avg, exp_avg_sq read; param, exp_avg,
// exp_avg_sq written) with fused multiply-adds only, through the same thread pool and the same
// per-instruction-set compilation, so its speed is the most a one-pass Adam can reach here.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "common/macros.h"
#include "cpu/isa.h"
#include "cpu/multi_tensor.h"

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
  for (int64_t b = a.begin; b < a.end; b += 64) {
    const int64_t e = std::min(b + 64, a.end);
    for (int64_t l = 0; l < 64; l += 16) {
      __builtin_prefetch(param + b + 1024 + l, 1);
      __builtin_prefetch(grad + b + 1024 + l, 0);
      __builtin_prefetch(exp_avg + b + 1024 + l, 1);
      __builtin_prefetch(exp_avg_sq + b + 1024 + l, 1);
    }
    for (int64_t i = b; i < e; ++i) {
      const float g = grad[i];
      const float m = exp_avg[i] * 0.9f + g;
      const float v = exp_avg_sq[i] * 0.999f + g;
      exp_avg[i] = m;
      exp_avg_sq[i] = v;
      param[i] = param[i] + m * -1e-3f + v * 1e-6f;
    }
  }
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
