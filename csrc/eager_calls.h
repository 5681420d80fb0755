// Fast eager entry points into fastopt's multi-tensor ops, exposed by fastopt._C.
#pragma once

#include <Python.h>

namespace fastopt {

// <op>_eager(*args) takes the op's arguments in schema order and returns None, or NotImplemented
// where the caller must use torch.ops.fastopt.<op> instead (tensor subclasses, torch function
// modes).
PyObject* adam_step_eager(PyObject* self, PyObject* args);
PyObject* rmsprop_step_eager(PyObject* self, PyObject* args);
PyObject* adagrad_step_eager(PyObject* self, PyObject* args);
PyObject* adadelta_step_eager(PyObject* self, PyObject* args);

}  // namespace fastopt
