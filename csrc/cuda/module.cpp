// The Python entry point of fastopt._C_cuda. Importing it runs the static registrations of the
// CUDA kernels with the dispatcher; it has no functions of its own.
#include <Python.h>

namespace {
PyModuleDef module = {PyModuleDef_HEAD_INIT,
                      "_C_cuda",
                      "fastopt's CUDA kernels.",
                      -1,
                      nullptr,
                      nullptr,
                      nullptr,
                      nullptr,
                      nullptr};
}  // namespace

PyMODINIT_FUNC PyInit__C_cuda() {
  return PyModule_Create(&module);
}
