// fastopt::sparse_adagrad_step_ on the CPU: entries grouped by row, each touched row summed and
// updated once, the rows spread over the thread pool (see optim/sparse_adagrad.h).
#include "optim/sparse_adagrad.h"

#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "cpu/denormal_modes.h"
#include "cpu/dtype_switch.h"
#include "cpu/isa.h"

namespace fastopt::cpu {
namespace {

// Below this many row elements, one thread updates everything: forking costs more.
constexpr int64_t kMinElementsPerThread = 16384;

struct SparseAdagradJob {
  c10::ScalarType dtype;
  void* param;
  void* state_sum;
  void* values;  // [nnz, row_size]
  const int64_t* rows;
  const int64_t* order;           // entries in row order; nullptr: already in row order
  const int64_t* segment_starts;  // where each run of one row begins in that order; then nnz
  int64_t row_size;
  double neg_clr;
  double eps;
  double grad_sign;
  bool unscale;
  double grad_scale;
};

struct SparseAdagradPiece {
  const SparseAdagradJob* job;
  int64_t segment_begin;
  int64_t segment_end;
};

struct SparseAdagradLoop {
  // Touched rows are scattered over the param and its state, so each costs a trip to memory and
  // usually a page walk. Asking for the first line of each row this many segments ahead starts
  // the walks early and lets the hardware fetch the rest of each row; asking for every line of a
  // row (and for the gradient's values, which are read in order) filled the core's miss buffers
  // with requests, and the loop stalled on its own prefetches.
  static constexpr int64_t kRowsAhead = 16;

  template <typename S>
  FASTOPT_INLINE static void prefetch_segment(const SparseAdagradJob& job, int64_t segment,
                                              const S* param, const S* state_sum) {
    const int64_t first = job.segment_starts[segment];
    const int64_t row = job.rows[job.order ? job.order[first] : first];
    __builtin_prefetch(param + row * job.row_size, 1);
    __builtin_prefetch(state_sum + row * job.row_size, 1);
  }

  template <typename S>
  FASTOPT_INLINE static void run(const SparseAdagradPiece& piece) {
    using C = at::opmath_type<S>;
    const SparseAdagradJob& job = *piece.job;
    const int64_t width = job.row_size;
    S* param = static_cast<S*>(job.param);
    S* state_sum = static_cast<S*>(job.state_sum);
    S* values = static_cast<S*>(job.values);
    const C neg_clr = C(job.neg_clr), eps = C(job.eps), sign = C(job.grad_sign);
    const C scale = C(job.grad_scale);
    std::vector<C> grad(width);
    for (int64_t segment = piece.segment_begin; segment < piece.segment_end; ++segment) {
      if (segment + kRowsAhead < piece.segment_end)
        prefetch_segment(job, segment + kRowsAhead, param, state_sum);
      const int64_t first = job.segment_starts[segment];
      const int64_t last = job.segment_starts[segment + 1];
      std::fill(grad.begin(), grad.end(), C(0));
      for (int64_t k = first; k < last; ++k) {
        S* entry = values + (job.order ? job.order[k] : k) * width;
        for (int64_t j = 0; j < width; ++j) {
          C v = C(entry[j]);
          if (job.unscale) {
            v = v / scale;
            entry[j] = S(v);  // stored back unscaled, as for dense grads
          }
          grad[j] = grad[j] + v;
        }
      }
      const int64_t row = job.rows[job.order ? job.order[first] : first];
      S* __restrict__ p = param + row * width;
      S* __restrict__ sum = state_sum + row * width;
      for (int64_t j = 0; j < width; ++j) {
        C p_j = C(p[j]), sum_j = C(sum[j]);
        sparse_adagrad_update(p_j, sum_j, grad[j] * sign, neg_clr, eps);
        p[j] = S(p_j);
        sum[j] = S(sum_j);
      }
    }
  }
};

FASTOPT_INLINE void sparse_adagrad_piece_body(const SparseAdagradPiece& piece) {
  switch_param_dtype<SparseAdagradLoop>(piece.job->dtype, piece);
}

FASTOPT_DISPATCH_BY_ISA(sparse_adagrad_piece, sparse_adagrad_piece_body, SparseAdagradPiece)

// Groups the entries by row in O(nnz): `order` lists the entries row by row (rows in order of
// first appearance, entries of a row in their own order), and `segment_starts` where each row's
// run begins. A hash table, not a sort: sorting 4096 entries cost as much as updating them.
void group_entries_by_row(const int64_t* rows, int64_t nnz, std::vector<int64_t>& order,
                          std::vector<int64_t>& segment_starts) {
  int64_t capacity = 16;
  while (capacity < 2 * nnz) capacity *= 2;
  const uint64_t mask = uint64_t(capacity) - 1;
  std::vector<int64_t> slot_segment(capacity, -1);
  std::vector<int64_t> segment_rows;
  std::vector<int64_t> segment_of_entry(nnz);
  std::vector<int64_t> entries_in_segment;
  for (int64_t e = 0; e < nnz; ++e) {
    uint64_t slot = (uint64_t(rows[e]) * 0x9E3779B97F4A7C15ull) >> 20 & mask;
    while (slot_segment[slot] >= 0 && segment_rows[slot_segment[slot]] != rows[e]) {
      slot = (slot + 1) & mask;
    }
    if (slot_segment[slot] < 0) {
      slot_segment[slot] = int64_t(segment_rows.size());
      segment_rows.push_back(rows[e]);
      entries_in_segment.push_back(0);
    }
    segment_of_entry[e] = slot_segment[slot];
    ++entries_in_segment[slot_segment[slot]];
  }
  segment_starts.resize(segment_rows.size());
  int64_t start = 0;
  for (size_t segment = 0; segment < segment_rows.size(); ++segment) {
    segment_starts[segment] = start;
    start += entries_in_segment[segment];
  }
  order.resize(nnz);
  std::vector<int64_t> next = segment_starts;
  for (int64_t e = 0; e < nnz; ++e) order[next[segment_of_entry[e]]++] = e;
}

void sparse_adagrad_step_cpu(const at::Tensor& param, const at::Tensor& grad,
                             const at::Tensor& state_sum, const at::Tensor& step, double lr,
                             const std::optional<at::Tensor>& lr_tensor, double lr_decay,
                             double eps, bool maximize, const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf) {
  const SparseRows layout = check_sparse_adagrad_call(param, grad, state_sum, step, lr_tensor,
                                                      grad_scale, found_inf, c10::DeviceType::CPU);
  check_sparse_indices_in_bounds(grad);
  if (found_inf.has_value() && found_inf->item<double>() != 0) return;
  if (lr_tensor.has_value()) lr = lr_tensor->item<double>();
  const float new_step = *step.const_data_ptr<float>() + 1.0f;

  const at::Tensor rows_tensor = sparse_entry_rows(grad).contiguous();
  const int64_t* rows = rows_tensor.const_data_ptr<int64_t>();
  // The kernel walks the values as [nnz, row_size]; a strided copy is stored back after.
  const at::Tensor values = grad._values().contiguous();
  std::vector<int64_t> order;
  std::vector<int64_t> segment_starts;
  if (grad.is_coalesced()) {  // one entry per row already
    segment_starts.resize(layout.nnz);
    std::iota(segment_starts.begin(), segment_starts.end(), int64_t(0));
  } else {
    group_entries_by_row(rows, layout.nnz, order, segment_starts);
  }
  const int64_t segments = int64_t(segment_starts.size());
  segment_starts.push_back(layout.nnz);

  const SparseAdagradJob job{param.scalar_type(),
                             param.data_ptr(),
                             state_sum.data_ptr(),
                             values.data_ptr(),
                             rows,
                             order.empty() ? nullptr : order.data(),
                             segment_starts.data(),
                             layout.row_size,
                             -adagrad_clr(lr, lr_decay, new_step),
                             eps,
                             maximize ? -1.0 : 1.0,
                             grad_scale.has_value(),
                             grad_scale.has_value() ? grad_scale->item<double>() : 1.0};
  const int64_t grain =
      std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(1, layout.row_size));
  parallel_for_in_callers_denormal_modes(0, segments, grain, [&](int64_t begin, int64_t end) {
    sparse_adagrad_piece(SparseAdagradPiece{&job, begin, end});
  });
  store_back_unscaled_values(grad, values, grad_scale.has_value());
  *step.mutable_data_ptr<float>() = new_step;
}

}  // namespace

// A sparse grad sends the call to the SparseCPU key; a dense one gets the kernel's error.
TORCH_LIBRARY_IMPL(fastopt, SparseCPU, m) {
  m.impl("sparse_adagrad_step_", &sparse_adagrad_step_cpu);
}

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("sparse_adagrad_step_", &sparse_adagrad_step_cpu);
}

}  // namespace fastopt::cpu
