// Autograd and ADInplaceOrView kernels for the in-place multi-tensor optimizer ops.
//
// Without them the dispatcher runs torch's boxed fallbacks at these two keys, which box every
// tensor of every list on every call (for a model of 2000 params, a tenth of the step). These
// do what those fallbacks do, unboxed: refuse to run in grad mode when a tensor the op updates
// requires grad, and bump the version counter of every updated tensor so that autograd notices
// the change. Every Tensor and Tensor[] argument of these ops is updated in place (see their
// schemas), as is every tensor of a Tensor?[] (masters); optional tensors (lr_tensor,
// grad_scale, found_inf, grad_norm) are only read.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include "optim/sparse_adagrad.h"
#include "optim/step_ops.h"

namespace fastopt {
namespace {

template <typename F>
void for_each_tensor_in_lists(const F&) {}

template <typename F, typename First, typename... Rest>
void for_each_tensor_in_lists(const F& f, const First& first, const Rest&... rest) {
  if constexpr (std::is_same_v<std::decay_t<First>, at::TensorList>) {
    for (const at::Tensor& t : first) f(t);
  } else if constexpr (std::is_same_v<std::decay_t<First>, OptionalTensorList>) {
    for (const std::optional<at::Tensor> t : first) {
      if (t.has_value()) f(*t);
    }
  } else if constexpr (std::is_same_v<std::decay_t<First>, at::Tensor>) {
    f(first);
  }
  for_each_tensor_in_lists(f, rest...);
}

template <const char* kName, typename Signature>
struct InplaceOpKernels;

template <const char* kName, typename... Args>
struct InplaceOpKernels<kName, void(Args...)> {
  static const c10::TypedOperatorHandle<void(Args...)>& op() {
    static const auto handle =
        c10::Dispatcher::singleton().findSchemaOrThrow(kName, "").template typed<void(Args...)>();
    return handle;
  }

  static void autograd(c10::DispatchKeySet keys, Args... args) {
    if (c10::GradMode::is_enabled()) {
      for_each_tensor_in_lists(
          [](const at::Tensor& t) {
            TORCH_CHECK(!t.requires_grad(), op_display_name(kName),
                        " updates tensors in place and is not differentiable, but one of them "
                        "requires grad; call it under torch.no_grad() (optimizer.step() does)");
          },
          args...);
    }
    op().redispatch(keys & c10::after_autograd_keyset, args...);
  }

  static void inplace_or_view(c10::DispatchKeySet keys, Args... args) {
    {
      const at::AutoDispatchBelowADInplaceOrView guard;
      op().redispatch(keys & c10::after_ADInplaceOrView_keyset, args...);
    }
    for_each_tensor_in_lists([](const at::Tensor& t) { t.unsafeGetTensorImpl()->bump_version(); },
                             args...);
  }
};

// Registers each in-place op's kernel for the Autograd key, or for ADInplaceOrView.
template <bool kAutogradKey>
struct InplaceOpRegistrar {
  torch::Library& library;

  template <const char* kName, typename Signature>
  void add() const {
    using Kernels = InplaceOpKernels<kName, Signature>;
    if constexpr (kAutogradKey) {
      library.impl(kName, TORCH_FN(Kernels::autograd));
    } else {
      library.impl(kName, TORCH_FN(Kernels::inplace_or_view));
    }
  }
};

template <typename Registrar>
void register_inplace_ops(const Registrar& registrar) {
  StepRules::for_each([&registrar](auto rule) {
    using Rule = decltype(rule);
    registrar.template add<Rule::kOpName, typename StepOp<Rule>::Signature>();
  });
  registrar.template add<kSparseAdagradStepName, SparseAdagradStepSignature>();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, Autograd, m) {
  register_inplace_ops(InplaceOpRegistrar<true>{m});
}

TORCH_LIBRARY_IMPL(fastopt, ADInplaceOrView, m) {
  register_inplace_ops(InplaceOpRegistrar<false>{m});
}

}  // namespace fastopt
