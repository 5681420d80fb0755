// Fast eager entry points into fastopt's multi-tensor ops, exposed by fastopt._C.
#pragma once

#include <Python.h>

#include <vector>

namespace fastopt {

// Appends to `methods` one entry point per multi-tensor optimizer op of the op table, named as
// the op (adam_step_, ...). Each takes the op's arguments in schema order and returns None, or
// NotImplemented where the caller must use torch.ops.fastopt.<op> instead (tensor subclasses,
// torch function modes).
void add_eager_entries(std::vector<PyMethodDef>& methods);

}  // namespace fastopt
