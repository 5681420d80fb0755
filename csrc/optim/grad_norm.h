// fastopt::grad_norm, the total norm of many tensors (torch.nn.utils.get_total_norm, the norm
// that clip_grad_norm_ and the optimizers' clipping use): its argument checks, which every device
// and the meta kernel run, and the math of its reduction, which the CPU and CUDA kernels share.
//
// Each element x contributes a term (|x|^p, or |x| for the inf-norm); terms are accumulated in
// double, whatever the tensors' dtype (the CPU kernel first sums short runs of float32 terms
// where that is exact enough: cpu/grad_norm.cpp), and the accumulated value is finished into the
// norm (the p-th root) and divided by |grad_scale|. Accumulating in double keeps the float32
// result within a few roundings of the exact norm for any tensor size, and the float64 one close
// to it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <type_traits>

#include "common/macros.h"
#include "optim/optimizer_checks.h"
#include "optim/step_math.h"

namespace fastopt {

constexpr char kGradNormOp[] = "fastopt.grad_norm";

// The norm types with a loop of their own; any other p > 0 takes the general one (kPower).
enum class NormKind { kTwo, kOne, kInf, kPower };

inline NormKind norm_kind(double norm_type) {
  if (norm_type == 2.0) return NormKind::kTwo;
  if (norm_type == 1.0) return NormKind::kOne;
  if (std::isinf(norm_type)) return NormKind::kInf;
  return NormKind::kPower;
}

template <NormKind K>
using NormKindConstant = std::integral_constant<NormKind, K>;

// Calls f(NormKindConstant<K>{}) with K the kind of norm_type, and returns what it returns.
template <typename F>
decltype(auto) switch_norm_kind(double norm_type, const F& f) {
  switch (norm_kind(norm_type)) {
    case NormKind::kTwo:
      return f(NormKindConstant<NormKind::kTwo>{});
    case NormKind::kOne:
      return f(NormKindConstant<NormKind::kOne>{});
    case NormKind::kInf:
      return f(NormKindConstant<NormKind::kInf>{});
    default:
      return f(NormKindConstant<NormKind::kPower>{});
  }
}

// The arithmetic of norm kind K on accumulated values (doubles).
template <NormKind K>
struct NormMath {
  // The accumulated value with element x added.
  FASTOPT_HOST_DEVICE FASTOPT_INLINE static double add(double accumulated, double x, double p) {
    if constexpr (K == NormKind::kTwo) {
      return accumulated + x * x;
    } else if constexpr (K == NormKind::kOne) {
      return accumulated + fabs(x);
    } else if constexpr (K == NormKind::kInf) {
      return nan_propagating_max(accumulated, fabs(x));
    } else {
      return accumulated + pow(fabs(x), p);
    }
  }

  // Two accumulated values combined (a partial sum of one range with another's).
  FASTOPT_HOST_DEVICE FASTOPT_INLINE static double combine(double a, double b) {
    if constexpr (K == NormKind::kInf) {
      return nan_propagating_max(a, b);
    } else {
      return a + b;
    }
  }

  // The norm of everything accumulated.
  FASTOPT_HOST_DEVICE FASTOPT_INLINE static double finish(double accumulated, double p) {
    if constexpr (K == NormKind::kTwo) {
      return sqrt(accumulated);
    } else if constexpr (K == NormKind::kOne || K == NormKind::kInf) {
      return accumulated;
    } else {
      return pow(accumulated, 1.0 / p);
    }
  }
};

// Checks fastopt::grad_norm's arguments for a kernel of `device_type`, before anything is read,
// and returns the dtype of its result: float64 if any tensor is float64, else float32.
inline at::ScalarType check_grad_norm(at::TensorList tensors, double norm_type,
                                      const std::optional<at::Tensor>& grad_scale,
                                      c10::DeviceType device_type) {
  const char* op = kGradNormOp;
  TORCH_CHECK(norm_type > 0, op,
              ": norm_type must be a number > 0 or inf (2.0, 1.0, inf, ...), got ", norm_type);
  at::ScalarType result = at::kFloat;
  if (tensors.empty()) return result;
  const at::Device device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    prefetch_tensor_metadata(tensors, i + kMetadataPrefetchDistance);
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == device, op, ": tensors[", i, "] is on ", t.device(),
                " but tensors[0] is on ", device,
                "; one call takes tensors of one device (call it once per device and combine the "
                "norms)");
    TORCH_CHECK(is_supported_param_dtype(t.scalar_type()), op, ": tensors[", i, "] has dtype ",
                t.scalar_type(), "; supported are float32, float64, float16 and bfloat16");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": tensors[", i, "] has layout ", t.layout(),
                "; only dense (strided) tensors are supported (for a sparse COO tensor pass "
                "t.coalesce().values())");
    TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": tensors[", i,
                "] is not stored densely (a strided view?); pass t.contiguous()");
    if (t.scalar_type() == at::kDouble) result = at::kDouble;
  }
  TORCH_CHECK(device.type() == device_type, op, ": the tensors are on ", device, ", expected ",
              c10::DeviceTypeName(device_type));
  check_scalar_tensor(op, "grad_scale", grad_scale, device);
  return result;
}

}  // namespace fastopt
