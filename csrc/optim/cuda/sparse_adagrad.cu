// fastopt::sparse_adagrad_step_ on CUDA: entries sorted by row on the device (unless the gradient
// is coalesced); one block per entry, and the block at the start of each row's run sums the run
// and updates the row (see optim/sparse_adagrad.h). Nothing is read back to the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "optim/cuda/multi_tensor_step.cuh"
#include "optim/cuda/step_counts.cuh"
#include "optim/sparse_adagrad.h"

namespace fastopt::cuda {
namespace {

constexpr int kMaxThreads = 256;

struct SparseAdagradArgs {
  const int64_t* sorted_rows;  // the entries' rows, in row order
  const int64_t* order;        // the entries in row order; nullptr: already in row order
  int64_t nnz;
  int64_t row_size;
  LearningRate lr;
  const float* step;
  double lr_decay;
  double eps;
  bool maximize;
  const float* grad_scale;  // nullptr: not scaled
  const float* found_inf;   // nullptr: no inf check
};

template <typename S>
__global__ void sparse_adagrad_kernel(S* param, S* state_sum, S* values,
                                      const SparseAdagradArgs a) {
  using C = at::opmath_type<S>;
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  const int64_t first = blockIdx.x;
  const int64_t row = a.sorted_rows[first];
  if (first > 0 && a.sorted_rows[first - 1] == row) return;  // not the start of its row's run
  int64_t last = first + 1;
  while (last < a.nnz && a.sorted_rows[last] == row) ++last;

  // The counter is advanced after this kernel: this step's count is the stored one plus 1.
  const double step = double(*a.step + 1.0f);
  const C neg_clr = C(-adagrad_clr(a.lr.read(), a.lr_decay, step));
  const C sign = a.maximize ? C(-1) : C(1);
  for (int64_t j = threadIdx.x; j < a.row_size; j += blockDim.x) {
    C grad = C(0);
    for (int64_t k = first; k < last; ++k) {
      S* entry = values + (a.order ? a.order[k] : k) * a.row_size + j;
      C v = C(*entry);
      if (a.grad_scale != nullptr) {
        v = v / C(*a.grad_scale);
        *entry = S(v);  // stored back unscaled, as for dense grads
      }
      grad = grad + v;
    }
    const int64_t at = row * a.row_size + j;
    C p = C(param[at]), sum = C(state_sum[at]);
    sparse_adagrad_update(p, sum, grad * sign, neg_clr, C(a.eps));
    param[at] = S(p);
    state_sum[at] = S(sum);
  }
}

void sparse_adagrad_step_cuda(const at::Tensor& param, const at::Tensor& grad,
                              const at::Tensor& state_sum, const at::Tensor& step, double lr,
                              const std::optional<at::Tensor>& lr_tensor, double lr_decay,
                              double eps, bool maximize,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf) {
  const SparseRows layout = check_sparse_adagrad_call(param, grad, state_sum, step, lr_tensor,
                                                      grad_scale, found_inf, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(param.device());
  // The kernel walks the values as [nnz, row_size]; a strided copy is stored back after.
  const at::Tensor values = grad._values().contiguous();
  if (layout.nnz > 0 && layout.row_size > 0) {
    at::Tensor sorted_rows = sparse_entry_rows(grad).contiguous();
    at::Tensor order;
    if (!grad.is_coalesced()) {
      std::tie(sorted_rows, order) = at::sort(sorted_rows, /*stable=*/true, 0, false);
    }
    const SparseAdagradArgs args{sorted_rows.const_data_ptr<int64_t>(),
                                 order.defined() ? order.const_data_ptr<int64_t>() : nullptr,
                                 layout.nnz,
                                 layout.row_size,
                                 learning_rate(lr, lr_tensor),
                                 step.const_data_ptr<float>(),
                                 lr_decay,
                                 eps,
                                 maximize,
                                 float_pointer(grad_scale),
                                 float_pointer(found_inf)};
    const int threads = int(std::min<int64_t>(kMaxThreads, (layout.row_size + 31) / 32 * 32));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, param.scalar_type(), "fastopt_sparse_adagrad_cuda", [&] {
          sparse_adagrad_kernel<scalar_t><<<layout.nnz, threads, 0, stream>>>(
              param.data_ptr<scalar_t>(), state_sum.data_ptr<scalar_t>(),
              values.data_ptr<scalar_t>(), args);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  store_back_unscaled_values(grad, values, grad_scale.has_value());
  increment_steps({step}, float_pointer(found_inf));
}

}  // namespace

// A sparse grad sends the call to the SparseCUDA key; a dense one gets the kernel's error.
TORCH_LIBRARY_IMPL(fastopt, SparseCUDA, m) {
  m.impl("sparse_adagrad_step_", &sparse_adagrad_step_cuda);
}

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("sparse_adagrad_step_", &sparse_adagrad_step_cuda);
}

}  // namespace fastopt::cuda
