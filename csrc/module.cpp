// The Python entry point of fastopt._C. Importing it runs the static registrations of the CPU
// kernels with the dispatcher. Its functions report and steer the instruction set choice
// (python -m fastopt info, and tests that check every compiled variant), and call the
// multi-tensor ops on the fast eager path of eager_calls.cpp.
#include <Python.h>
#include <c10/util/Exception.h>

#include <vector>

#include "cpu/isa.h"
#include "eager_calls.h"
#include "layers/cpu/int8_tiles.h"

namespace {

using fastopt::cpu::isa_name;

// C++ errors (a bad FASTOPT_CPU_ISA, an unsupported instruction set) become ValueError.
template <typename F>
PyObject* returning_isa_name(const F& get_isa) {
  try {
    return PyUnicode_FromString(isa_name(get_isa()));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* active_cpu_isa(PyObject*, PyObject*) {
  return returning_isa_name([] { return fastopt::cpu::active_isa(); });
}

PyObject* best_cpu_isa(PyObject*, PyObject*) {
  return returning_isa_name([] { return fastopt::cpu::best_supported_isa(); });
}

// set_cpu_isa(name) -> the name of the previous choice.
PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  return returning_isa_name([name] {
    const fastopt::cpu::Isa previous = fastopt::cpu::active_isa();
    fastopt::cpu::set_active_isa(fastopt::cpu::parse_isa(name));
    return previous;
  });
}

PyObject* int8_kernels(PyObject*, PyObject*) {
  return PyUnicode_FromString(fastopt::cpu::int8::active_int8_kernels().name);
}

// The module's functions: the instruction-set queries, then the eager entry points.
PyMethodDef* methods() {
  static std::vector<PyMethodDef> table = [] {
    std::vector<PyMethodDef> t{
        {"active_cpu_isa", active_cpu_isa, METH_NOARGS, "The instruction set the CPU kernels use."},
        {"best_cpu_isa", best_cpu_isa, METH_NOARGS,
         "The widest instruction set this CPU supports."},
        {"set_cpu_isa", set_cpu_isa, METH_O,
         "Makes the CPU kernels use the named instruction set; returns the previous one."},
        {"int8_kernels", int8_kernels, METH_NOARGS,
         "The int8 GEMM variant the active instruction set runs: amx, vnni, avx2 or portable."}};
    fastopt::add_eager_entries(t);
    t.push_back({nullptr, nullptr, 0, nullptr});
    return t;
  }();
  return table.data();
}

PyModuleDef module = {PyModuleDef_HEAD_INIT,
                      "_C",
                      "fastopt's CPU kernels.",
                      -1,
                      nullptr,
                      nullptr,
                      nullptr,
                      nullptr,
                      nullptr};

}  // namespace

// The module also holds the packed int8 weight layout's constants (layers/cpu/int8_tiles.h),
// which fastopt/_library.py restates for the fakes and a test compares with these.
PyMODINIT_FUNC PyInit__C() {
  module.m_methods = methods();
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "INT8_BLOCK_N", fastopt::cpu::int8::kBlockN) < 0 ||
      PyModule_AddIntConstant(m, "INT8_GROUP_K", fastopt::cpu::int8::kGroupK) < 0 ||
      PyModule_AddIntConstant(m, "INT8_MAX_IN_FEATURES", fastopt::cpu::int8::kMaxInFeatures) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
