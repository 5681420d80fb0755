// The CPU optimizer step's element loop timed in cache, one core, per storage layout: what the
// loop costs in instructions when memory is not the limit. A step from memory can only overlap
// this time with its memory traffic, so a loop close to its memory time in cache cannot reach
// the roofline from memory (benchmarks/results/cpu-precision.md uses it that way).
//
// Build and run with run.sh (it compiles this file against the checkout's csrc/ and torch's
// headers): `benchmarks/in_cache/run.sh [params]`, 4096 params by default (4 streams of them
// stay in the L1 and L2 caches). It prints ns per param, the fastest of 5 rounds, for AdamW, of
// the compiler's vectorization of the scalar element code (what the baseline level runs) and the
// hand-vectorized loop, each compiled for AVX-512 (16 lanes; the machine must have it) and for
// AVX2 (8 lanes).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cpu/isa.h"
#include "optim/adam_rule.h"
#include "optim/cpu/multi_tensor_step.h"

namespace {

using fastopt::AdamRule;
using fastopt::MasterKind;
using fastopt::Storage;
using fastopt::cpu::StepLanes;
using fastopt::cpu::StepLoop;
using fastopt::cpu::StepPiece;
using fastopt::cpu::StepTensor;

template <typename St, StepLanes LANES>
FASTOPT_TARGET_AVX512 __attribute__((noinline)) void run_piece_avx512(
    const StepPiece<AdamRule>& piece) {
  StepLoop<AdamRule, 0, false, LANES>::template run<St>(piece);
}

template <typename St, StepLanes LANES>
FASTOPT_TARGET_AVX2 __attribute__((noinline)) void run_piece_avx2(
    const StepPiece<AdamRule>& piece) {
  StepLoop<AdamRule, 0, false, LANES>::template run<St>(piece);
}

// ns per param of the loop over n params of layout St: the fastest of `rounds` rounds.
// `run_piece` runs the loop of layout St on a piece.
template <typename St>
double ns_per_param(void (*run_piece)(const StepPiece<AdamRule>&), int64_t n, int rounds) {
  using S = typename St::Param;
  using T = typename St::State;
  std::vector<S> param(n, S(0.5f)), grad(n, S(0.001f));
  std::vector<T> exp_avg(n, T(0.0f)), exp_avg_sq(n, T(0.0f));
  std::vector<fastopt::MasterElement<St>> master(n);
  StepTensor<AdamRule> tensor{};
  tensor.param = param.data();
  tensor.grad = grad.data();
  tensor.master = master.data();
  tensor.state = {exp_avg.data(), exp_avg_sq.data(), nullptr};
  tensor.rounding_keys = {1u, 2u};
  const fastopt::AdamOptions options{0.9, 0.999, 1e-8, 0.01, true, false};
  tensor.coefficients_float = fastopt::adam_coefficients<float>(options, 1e-3, 10);
  tensor.coefficients_double = fastopt::adam_coefficients<double>(options, 1e-3, 10);
  const StepPiece<AdamRule> piece{&tensor, 0, false, 1.0, 1.0, 0, n};
  const int calls = int(std::max<int64_t>(1, int64_t(2e8) / n));
  double best = 1e30;
  for (int round = 0; round < rounds; ++round) {
    run_piece(piece);  // warm the caches
    const auto start = std::chrono::steady_clock::now();
    for (int c = 0; c < calls; ++c) run_piece(piece);
    const std::chrono::duration<double, std::nano> took = std::chrono::steady_clock::now() - start;
    best = std::min(best, took.count() / calls / double(n));
  }
  return best;
}

template <typename S, typename T, MasterKind M, bool STOCHASTIC>
void report(const char* name, int64_t n) {
  using St = Storage<S, T, M, STOCHASTIC>;
  std::printf("| %s | %.3f | %.3f | %.3f | %.3f |\n", name,
              ns_per_param<St>(run_piece_avx512<St, StepLanes::kCompilerVectorized>, n, 5),
              ns_per_param<St>(run_piece_avx512<St, StepLanes::kAvx512>, n, 5),
              ns_per_param<St>(run_piece_avx2<St, StepLanes::kCompilerVectorized>, n, 5),
              ns_per_param<St>(run_piece_avx2<St, StepLanes::kAvx2>, n, 5));
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atol(argv[1]) : 4096;
  using BF16 = c10::BFloat16;
  std::printf("AdamW element loop in cache, %ld params, one core, ns per param\n", long(n));
  std::printf(
      "| layout | AVX-512 compiler-vectorized | 16 float lanes | AVX2 compiler-vectorized | 8 "
      "float lanes |\n|---|---:|---:|---:|---:|\n");
  report<float, float, MasterKind::kNone, false>("fp32", n);
  report<float, BF16, MasterKind::kNone, false>("fp32 + bf16 state (nearest)", n);
  report<float, BF16, MasterKind::kNone, true>("fp32 + bf16 state", n);
  report<BF16, float, MasterKind::kFloat, false>("bf16 + fp32 master + fp32 state", n);
  report<BF16, BF16, MasterKind::kFloat, true>("bf16 + fp32 master + bf16 state", n);
  report<BF16, BF16, MasterKind::kBf16Remainder, true>("bf16 + remainder + bf16 state", n);
  // A bf16 model stepped with the default options: state in bf16, rounded to nearest.
  report<BF16, BF16, MasterKind::kNone, false>("bf16 + bf16 state (nearest)", n);
}
