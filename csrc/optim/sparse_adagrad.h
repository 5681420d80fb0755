// fastopt::sparse_adagrad_step_: Adagrad for a sparse COO gradient (nn.Embedding(sparse=True)),
// shared by the CPU and CUDA kernels: the input checks, the layout of the rows a gradient
// touches, and the math of one element of a touched row.
//
// torch's sparse Adagrad coalesces the gradient (sorts its indices and sums duplicates), then
// updates only the rows present. The kernels do the same in one pass: the entries are grouped by
// row (unless the gradient is already coalesced), each group's values are summed and its
// row updated at once.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>

#include "common/macros.h"
#include "optim/adagrad_rule.h"
#include "optim/optimizer_checks.h"
#include "optim/step_op.h"

namespace fastopt {

// Its schema (fastopt/_library.py), for the code that calls it through the dispatcher.
inline constexpr char kSparseAdagradStepName[] = "fastopt::sparse_adagrad_step_";
using SparseAdagradStepSignature = void(const at::Tensor& param, const at::Tensor& grad,
                                        const at::Tensor& state_sum, const at::Tensor& step,
                                        double lr, const std::optional<at::Tensor>& lr_tensor,
                                        double lr_decay, double eps, bool maximize,
                                        const std::optional<at::Tensor>& grad_scale,
                                        const std::optional<at::Tensor>& found_inf);

// One element of a touched row: `grad` is the row's summed, unscaled gradient, its sign applied.
template <typename C>
FASTOPT_HOST_DEVICE FASTOPT_INLINE void sparse_adagrad_update(C& param, C& state_sum, C grad,
                                                              C neg_clr, C eps) {
  state_sum = state_sum + grad * grad;
  const C std = sqrt(state_sum) + eps;
  param = param + neg_clr * (grad / std);
}

// How the sparse gradient maps onto the param: entry e of grad._values() (shape [nnz, row_size])
// is row `row of e` of the param viewed as [rows, row_size].
struct SparseRows {
  int64_t nnz;
  int64_t row_size;  // elements per row: the product of the gradient's dense dimensions
  int64_t rows;      // the product of its sparse dimensions
};

inline SparseRows check_sparse_adagrad_call(const at::Tensor& param, const at::Tensor& grad,
                                            const at::Tensor& state_sum, const at::Tensor& step,
                                            const std::optional<at::Tensor>& lr_tensor,
                                            const std::optional<at::Tensor>& grad_scale,
                                            const std::optional<at::Tensor>& found_inf,
                                            c10::DeviceType device_type) {
  static const std::string name = op_display_name(kSparseAdagradStepName);
  const char* op = name.c_str();
  TORCH_CHECK(param.device().type() == device_type, op, ": param is on ", param.device(),
              ", expected ", c10::DeviceTypeName(device_type));
  TORCH_CHECK(is_supported_param_dtype(param.scalar_type()), op, ": param has dtype ",
              param.scalar_type(), "; supported are float32, float64, float16 and bfloat16");
  TORCH_CHECK(param.layout() == at::kStrided && param.is_contiguous(), op,
              ": param must be a contiguous dense tensor; make it contiguous first");
  TORCH_CHECK(grad.layout() == at::kSparse, op, ": grad must be a sparse COO tensor, got layout ",
              grad.layout(), "; use adagrad_step_ for dense gradients");
  TORCH_CHECK(grad.device() == param.device() && grad.scalar_type() == param.scalar_type() &&
                  grad.sizes() == param.sizes(),
              op, ": grad is ", grad.scalar_type(), " ", grad.sizes(), " on ", grad.device(),
              " but param is ", param.scalar_type(), " ", param.sizes(), " on ", param.device());
  TORCH_CHECK(state_sum.layout() == at::kStrided && state_sum.is_contiguous() &&
                  state_sum.device() == param.device() &&
                  state_sum.scalar_type() == param.scalar_type() &&
                  state_sum.sizes() == param.sizes(),
              op, ": state_sum must be a contiguous tensor of the param's dtype, shape and device");
  TORCH_CHECK(
      step.numel() == 1 && step.scalar_type() == at::kFloat && step.device() == param.device(), op,
      ": step must be a one-element float32 tensor on ", param.device());
  check_scalar_tensor(op, "lr_tensor", lr_tensor, param.device(), /*cpu_allowed=*/true,
                      /*float64_allowed=*/true);
  check_scalar_tensor(op, "grad_scale", grad_scale, param.device());
  check_scalar_tensor(op, "found_inf", found_inf, param.device());

  SparseRows layout{grad._nnz(), 1, 1};
  const int64_t sparse_dim = grad.sparse_dim();
  for (int64_t d = 0; d < grad.dim(); ++d) {
    (d < sparse_dim ? layout.rows : layout.row_size) *= grad.size(d);
  }
  return layout;
}

// Refuses a gradient entry outside the param, as torch's sparse Adagrad does (an IndexError):
// the kernels would write outside it. A sparse tensor made without torch's invariant checks
// (their default) can hold such entries. On CUDA the bounds come back to the host, a
// synchronization, as torch's coalesce of the gradient makes one too.
inline void check_sparse_indices_in_bounds(const at::Tensor& grad) {
  if (grad._nnz() == 0) return;
  const auto [low, high] = at::aminmax(grad._indices(), /*dim=*/1);
  const at::Tensor bounds = at::stack({low, high}).cpu();
  const auto bound = bounds.accessor<int64_t, 2>();
  for (int64_t d = 0; d < grad.sparse_dim(); ++d) {
    const int64_t outside = bound[0][d] < 0 ? bound[0][d] : bound[1][d];
    TORCH_CHECK_INDEX(bound[0][d] >= 0 && bound[1][d] < grad.size(d),
                      op_display_name(kSparseAdagradStepName), ": grad has an entry at index ",
                      outside, " of dimension ", d, ", out of bounds for the param's size ",
                      grad.size(d), "; a sparse grad may only hold indices within its param");
  }
}

// The row of every entry of a checked gradient, an int64 tensor [nnz] on its device.
inline at::Tensor sparse_entry_rows(const at::Tensor& grad) {
  const at::Tensor indices = grad._indices();
  if (grad.sparse_dim() == 0) return at::zeros({grad._nnz()}, indices.options());
  at::Tensor rows = indices[0];
  for (int64_t d = 1; d < grad.sparse_dim(); ++d) rows = rows * grad.size(d) + indices[d];
  return rows;
}

// Where the kernel unscaled `values`, a contiguous copy of the gradient's strided values, the
// gradient gets them back (it holds unscaled values after the step, as dense grads do).
inline void store_back_unscaled_values(const at::Tensor& grad, const at::Tensor& values,
                                       bool unscaled) {
  if (unscaled && !values.is_same(grad._values())) grad._values().copy_(values);
}

}  // namespace fastopt
