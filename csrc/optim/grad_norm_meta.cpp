// fastopt::grad_norm where no device kernel runs: on meta tensors (how torch.compile and
// FakeTensor trace it: the checks every device runs, and the result's shape and dtype), and with
// no tensor at all (an empty list), where the norm is 0, as torch's get_total_norm returns.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "optim/grad_norm.h"

namespace fastopt {
namespace {

at::Tensor grad_norm_meta(at::TensorList tensors, double norm_type,
                          const std::optional<at::Tensor>& grad_scale) {
  const at::ScalarType dtype =
      check_grad_norm(tensors, norm_type, grad_scale, c10::DeviceType::Meta);
  return at::empty({}, at::TensorOptions().dtype(dtype).device(c10::DeviceType::Meta));
}

// The dispatcher calls this where no kernel of a device key applies: an empty list (no tensor
// to choose a device by), sparse tensors, or tensors of a device fastopt has no kernels for.
at::Tensor grad_norm_without_device_kernel(at::TensorList tensors, double norm_type,
                                           const std::optional<at::Tensor>& grad_scale) {
  if (!tensors.empty()) {
    // The arguments' own faults first (a sparse tensor lands here: no sparse kernel).
    check_grad_norm(tensors, norm_type, grad_scale, tensors[0].device().type());
    TORCH_CHECK(false, kGradNormOp, ": no kernel for tensors on ", tensors[0].device(),
                "; fastopt's kernels run on the CPU and, where its CUDA extension is built, on "
                "CUDA");
  }
  check_grad_norm(tensors, norm_type, grad_scale, c10::DeviceType::CPU);
  const at::Device device = grad_scale.has_value() ? grad_scale->device() : at::Device(at::kCPU);
  return at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, Meta, m) {
  m.impl("grad_norm", &grad_norm_meta);
}

TORCH_LIBRARY_IMPL(fastopt, CompositeExplicitAutograd, m) {
  m.impl("grad_norm", &grad_norm_without_device_kernel);
}

// Sparse tensors dispatch to their own keys, which the composite kernel does not cover.
TORCH_LIBRARY_IMPL(fastopt, SparseCPU, m) {
  m.impl("grad_norm", &grad_norm_without_device_kernel);
}

TORCH_LIBRARY_IMPL(fastopt, SparseCUDA, m) {
  m.impl("grad_norm", &grad_norm_without_device_kernel);
}

}  // namespace fastopt
