// fastopt::sparse_adagrad_step_ on CUDA: entries sorted by row on the device (unless the gradient
// is coalesced, by torch's sort), then each row's run of entries summed and the row updated (see
// optim/sparse_adagrad.h). Nothing is read back to the host.
//
// The sorted entries are cut into windows of kWindowEntries. A run within one window is summed
// and its row updated by one block. A run that crosses windows (a row repeated more often than
// that: a frequent token) is summed piece by piece, one block per window, into `partials`; a
// second kernel adds up the pieces of each such run and updates its row. So no block walks more
// than kWindowEntries entries plus one partial sum per window of the run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>

#include "optim/cuda/launch.cuh"
#include "optim/cuda/multi_tensor_step.cuh"
#include "optim/cuda/step_counts.cuh"
#include "optim/sparse_adagrad.h"

namespace fastopt::cuda {
namespace {

constexpr int kMaxThreads = 256;
constexpr int64_t kWindowEntries = 256;
// Enough blocks to fill any GPU; the kernels stride over the rest.
constexpr int64_t kMaxBlocks = 8192;

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

// Slots of `partials` ([2 * windows, row_size]): per window, the piece of the run that came
// into it from the previous window, and the piece of a run that starts in it and goes on.
__device__ __forceinline__ int64_t partial_slot(int64_t window, bool came_in) {
  return 2 * window + (came_in ? 0 : 1);
}

// Column j of the sum of sorted entries [first, last), unscaled (and stored back unscaled).
template <typename S, typename C = at::opmath_type<S>>
__device__ __forceinline__ C sum_entries(S* values, const SparseAdagradArgs& a, int64_t first,
                                         int64_t last, int64_t j) {
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
  return grad;
}

// -lr / (1 + (step - 1) * lr_decay) of this step.
template <typename C>
__device__ __forceinline__ C negative_step_size(const SparseAdagradArgs& a) {
  // The counter is advanced after these kernels: this step's count is the stored one plus 1.
  const double step = double(*a.step + 1.0f);
  return C(-adagrad_clr(a.lr.read(), a.lr_decay, step));
}

// Column j of `row` takes its Adagrad step with the row's summed, unscaled gradient.
template <typename S, typename C = at::opmath_type<S>>
__device__ __forceinline__ void update_row(S* param, S* state_sum, const SparseAdagradArgs& a,
                                           int64_t row, int64_t j, C grad, C neg_clr) {
  const int64_t at = row * a.row_size + j;
  C p = C(param[at]), sum = C(state_sum[at]);
  sparse_adagrad_update(p, sum, a.maximize ? -grad : grad, neg_clr, C(a.eps));
  param[at] = S(p);
  state_sum[at] = S(sum);
}

// One block per piece: a run of one row within one window. A whole run updates its row; a piece
// of a longer run leaves its sum in `partials`.
template <typename S>
__global__ void sum_pieces_kernel(S* param, S* state_sum, S* values, at::opmath_type<S>* partials,
                                  const SparseAdagradArgs a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  const auto neg_clr = negative_step_size<at::opmath_type<S>>(a);
  for (int64_t first = blockIdx.x; first < a.nnz; first += gridDim.x) {
    const int64_t row = a.sorted_rows[first];
    const bool came_in = first > 0 && a.sorted_rows[first - 1] == row;
    const int64_t window = first / kWindowEntries;
    if (came_in && first % kWindowEntries != 0) continue;  // inside a piece
    const int64_t window_end = min(a.nnz, (window + 1) * kWindowEntries);
    int64_t last = first + 1;
    while (last < window_end && a.sorted_rows[last] == row) ++last;
    const bool goes_on = last == window_end && last < a.nnz && a.sorted_rows[last] == row;
    for (int64_t j = threadIdx.x; j < a.row_size; j += blockDim.x) {
      const auto grad = sum_entries(values, a, first, last, j);
      if (came_in || goes_on) {
        partials[partial_slot(window, came_in) * a.row_size + j] = grad;
      } else {
        update_row(param, state_sum, a, row, j, grad, neg_clr);
      }
    }
  }
}

// One block per window where a run that came in from earlier windows ends: adds up its pieces,
// walking back to the window where it started, and updates its row.
template <typename S>
__global__ void finish_long_runs_kernel(S* param, S* state_sum, const at::opmath_type<S>* partials,
                                        const SparseAdagradArgs a) {
  using C = at::opmath_type<S>;
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  const C neg_clr = negative_step_size<C>(a);
  const int64_t windows = (a.nnz + kWindowEntries - 1) / kWindowEntries;
  for (int64_t window = blockIdx.x; window < windows; window += gridDim.x) {
    const int64_t first = window * kWindowEntries;
    const int64_t row = a.sorted_rows[first];
    const int64_t window_end = min(a.nnz, first + kWindowEntries);
    const bool came_in = first > 0 && a.sorted_rows[first - 1] == row;
    const bool goes_on = window_end < a.nnz && a.sorted_rows[window_end] == row;
    if (!came_in || goes_on) continue;
    for (int64_t j = threadIdx.x; j < a.row_size; j += blockDim.x) {
      C grad = partials[partial_slot(window, true) * a.row_size + j];
      int64_t w = window - 1;
      while (w > 0 && a.sorted_rows[w * kWindowEntries - 1] == row) {  // the run fills window w
        grad = grad + partials[partial_slot(w, true) * a.row_size + j];
        --w;
      }
      grad = grad + partials[partial_slot(w, false) * a.row_size + j];  // where the run started
      update_row(param, state_sum, a, row, j, grad, neg_clr);
    }
  }
}

void sparse_adagrad_step_cuda(const at::Tensor& param, const at::Tensor& grad,
                              const at::Tensor& state_sum, const at::Tensor& step, double lr,
                              const std::optional<at::Tensor>& lr_tensor, double lr_decay,
                              double eps, bool maximize,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf) {
  const SparseRows layout = check_sparse_adagrad_call(param, grad, state_sum, step, lr_tensor,
                                                      grad_scale, found_inf, kKernelDevice);
  check_sparse_indices_in_bounds(grad);
  const DeviceGuard guard(param.device());
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
                                 learning_rate(lr, lr_tensor, param.device()),
                                 step.const_data_ptr<float>(),
                                 lr_decay,
                                 eps,
                                 maximize,
                                 float_pointer(grad_scale),
                                 float_pointer(found_inf)};
    const int threads = int(std::min<int64_t>(kMaxThreads, (layout.row_size + 31) / 32 * 32));
    const int64_t windows = (layout.nnz + kWindowEntries - 1) / kWindowEntries;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, param.scalar_type(), "fastopt_sparse_adagrad_cuda", [&] {
          using C = at::opmath_type<scalar_t>;
          // Only a run longer than one window leaves pieces, so one window needs no partials.
          at::Tensor partials;
          if (windows > 1) {
            partials = at::empty({2 * windows, layout.row_size},
                                 values.options().dtype(c10::CppTypeToScalarType<C>::value));
          }
          C* partials_data = windows > 1 ? partials.mutable_data_ptr<C>() : nullptr;
          launch_kernel(&sum_pieces_kernel<scalar_t>, std::min(layout.nnz, kMaxBlocks), threads,
                        param.mutable_data_ptr<scalar_t>(), state_sum.mutable_data_ptr<scalar_t>(),
                        values.mutable_data_ptr<scalar_t>(), partials_data, args);
          if (windows > 1) {
            launch_kernel(&finish_long_runs_kernel<scalar_t>, std::min(windows, kMaxBlocks),
                          threads, param.mutable_data_ptr<scalar_t>(),
                          state_sum.mutable_data_ptr<scalar_t>(),
                          static_cast<const C*>(partials_data), args);
          }
        });
  }
  store_back_unscaled_values(grad, values, grad_scale.has_value());
  increment_steps({step}, float_pointer(found_inf));
}

}  // namespace

// A sparse grad sends the call to the SparseCUDA key; a dense one gets the kernel's error.
FASTOPT_SPARSE_CUDA_KERNELS_IMPL(m) {
  m.impl("sparse_adagrad_step_", &sparse_adagrad_step_cuda);
}

FASTOPT_CUDA_KERNELS_IMPL(m) {
  m.impl("sparse_adagrad_step_", &sparse_adagrad_step_cuda);
}

}  // namespace fastopt::cuda
