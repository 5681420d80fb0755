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

#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "optim/step_ops.h"

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

// How one Python argument becomes the C++ argument of type T of an op's signature. parse() returns
// false where the caller must take torch.ops instead (a tensor subclass), or sets a Python error.
template <typename T>
struct PyArgument;

template <>
struct PyArgument<at::TensorList> {
  BorrowedTensors tensors;
  bool parse(PyObject* object) { return tensors.borrow(object); }
  at::TensorList get() const { return tensors.list(); }
};

template <>
struct PyArgument<std::optional<at::Tensor>> {
  std::optional<at::Tensor> tensor;
  bool parse(PyObject* object) {  // None -> empty; a plain tensor -> it; anything else -> false
    if (object == Py_None) return true;
    if (!THPVariable_CheckExact(object)) return false;
    tensor = THPVariable_Unpack(object);
    return true;
  }
  const std::optional<at::Tensor>& get() const { return tensor; }
};

template <>
struct PyArgument<OptionalTensorList> {  // a list of tensors and Nones
  OptionalTensorList tensors;
  bool parse(PyObject* object) {
    if (!PyList_Check(object) && !PyTuple_Check(object)) return false;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(object);
    PyObject** items = PySequence_Fast_ITEMS(object);
    tensors.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (items[i] == Py_None) {
        tensors.push_back(std::nullopt);
      } else if (THPVariable_CheckExact(items[i])) {
        tensors.push_back(THPVariable_Unpack(items[i]));
      } else {
        return false;
      }
    }
    return true;
  }
  const OptionalTensorList& get() const { return tensors; }
};

template <>
struct PyArgument<at::IntArrayRef> {  // a list of Python ints
  std::vector<int64_t> values;
  bool parse(PyObject* object) {
    if (!PyList_Check(object) && !PyTuple_Check(object)) return false;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(object);
    PyObject** items = PySequence_Fast_ITEMS(object);
    values.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!PyLong_Check(items[i])) return false;
      values.push_back(PyLong_AsLongLong(items[i]));
      if (PyErr_Occurred()) return false;
    }
    return true;
  }
  at::IntArrayRef get() const { return values; }
};

template <>
struct PyArgument<double> {
  double value = 0;
  bool parse(PyObject* object) {
    value = PyFloat_AsDouble(object);
    return !(value == -1.0 && PyErr_Occurred());
  }
  double get() const { return value; }
};

template <>
struct PyArgument<bool> {
  bool value = false;
  bool parse(PyObject* object) {
    const int truth = PyObject_IsTrue(object);
    value = truth == 1;
    return truth >= 0;
  }
  bool get() const { return value; }
};

template <const char* kName, typename Signature>
struct EagerCall;

template <const char* kName, typename... Args>
struct EagerCall<kName, void(Args...)> {
  static PyObject* call(PyObject*, PyObject* args) {
    return call(args, std::index_sequence_for<Args...>());
  }

  template <size_t... I>
  static PyObject* call(PyObject* args, std::index_sequence<I...>) {
    HANDLE_TH_ERRORS
    constexpr Py_ssize_t kArity = sizeof...(Args);
    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) != kArity) {
      PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", kName, kArity);
      return nullptr;
    }
    if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
    std::tuple<PyArgument<std::decay_t<Args>>...> parsed;
    const bool parsed_all = (std::get<I>(parsed).parse(PyTuple_GET_ITEM(args, I)) && ...);
    if (PyErr_Occurred()) return nullptr;
    if (!parsed_all) Py_RETURN_NOTIMPLEMENTED;
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(kName, "").template typed<void(Args...)>();
    {
      const GilRelease no_gil;
      op.call(std::get<I>(parsed).get()...);
    }
    Py_RETURN_NONE;
    END_HANDLE_TH_ERRORS
  }
};

}  // namespace

void add_eager_entries(std::vector<PyMethodDef>& methods) {
  StepRules::for_each([&methods](auto rule) {
    using Rule = decltype(rule);
    const char* name = std::strstr(Rule::kOpName, "::") + 2;  // the name without "fastopt::"
    methods.push_back({name, EagerCall<Rule::kOpName, typename StepOp<Rule>::Signature>::call,
                       METH_VARARGS,
                       "The op without per-tensor boxing (its schema's arguments in order), or "
                       "NotImplemented."});
  });
}

}  // namespace fastopt
