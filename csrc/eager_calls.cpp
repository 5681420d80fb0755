// Calling torch.ops.fastopt.* from Python converts each tensor of each list to an IValue on the
// boxed path, about 0.15 us a tensor: 1.5 ms a step for a model of 2000 params (five lists),
// a third of the step itself. These entry points unpack the lists directly and call the same op
// through the dispatcher, unboxed, so every dispatch key still applies (autograd checks,
// functionalization, Python dispatch modes, CPU or CUDA kernel). fastopt.functional takes this
// path in eager mode and torch.ops otherwise (torch.compile tracing); anything that needs
// Python-level dispatch (tensor subclasses, torch function modes) gets NotImplemented back and
// goes through torch.ops too.
#include "eager_calls.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <vector>

#include "op_signatures.h"

namespace fastopt {
namespace {

// Releases the GIL while the kernels run, and takes it back on any exit.
class GilRelease {
 public:
  GilRelease() : state_(PyEval_SaveThread()) {}
  ~GilRelease() { PyEval_RestoreThread(state_); }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_;
};

// The tensors of a Python list or tuple, borrowed: the Python objects keep them alive for the
// call, so no reference counts are touched (with Python-owned tensors each count change costs a
// call into the interpreter; 10000 tensors a step add up).
class BorrowedTensors {
 public:
  BorrowedTensors() = default;
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  ~BorrowedTensors() {
    for (at::Tensor& t : tensors_) t.unsafeReleaseTensorImpl();
  }

  // False if `sequence` is not a list or tuple of plain tensors (or Parameters).
  bool borrow(PyObject* sequence) {
    if (!PyList_Check(sequence) && !PyTuple_Check(sequence)) return false;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(sequence);
    PyObject** items = PySequence_Fast_ITEMS(sequence);
    tensors_.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_CheckExact(items[i])) return false;
      tensors_.emplace_back(c10::intrusive_ptr<at::TensorImpl, c10::UndefinedTensorImpl>::reclaim(
          THPVariable_Unpack(items[i]).unsafeGetTensorImpl()));
    }
    return true;
  }

  at::TensorList list() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
};

// None -> empty; a plain tensor -> it; anything else -> false.
bool optional_plain_tensor(PyObject* object, std::optional<at::Tensor>& out) {
  if (object == Py_None) return true;
  if (!THPVariable_CheckExact(object)) return false;
  out = THPVariable_Unpack(object);
  return true;
}

}  // namespace

PyObject* adam_step_eager(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* lists[6];
  PyObject *lr_object, *grad_scale_object, *found_inf_object;
  double lr, beta1, beta2, eps, weight_decay;
  int decoupled_weight_decay, amsgrad, maximize;
  if (!PyArg_ParseTuple(args, "OOOOOOdOddddpppOO", &lists[0], &lists[1], &lists[2], &lists[3],
                        &lists[4], &lists[5], &lr, &lr_object, &beta1, &beta2, &eps, &weight_decay,
                        &decoupled_weight_decay, &amsgrad, &maximize, &grad_scale_object,
                        &found_inf_object)) {
    return nullptr;
  }
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  BorrowedTensors tensors[6];
  for (int i = 0; i < 6; ++i) {
    if (!tensors[i].borrow(lists[i])) Py_RETURN_NOTIMPLEMENTED;
  }
  std::optional<at::Tensor> lr_tensor, grad_scale, found_inf;
  if (!optional_plain_tensor(lr_object, lr_tensor) ||
      !optional_plain_tensor(grad_scale_object, grad_scale) ||
      !optional_plain_tensor(found_inf_object, found_inf)) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow(kAdamStepName, "").typed<AdamStepSignature>();
  {
    const GilRelease no_gil;
    op.call(tensors[0].list(), tensors[1].list(), tensors[2].list(), tensors[3].list(),
            tensors[4].list(), tensors[5].list(), lr, lr_tensor, beta1, beta2, eps, weight_decay,
            decoupled_weight_decay != 0, amsgrad != 0, maximize != 0, grad_scale, found_inf);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

}  // namespace fastopt
