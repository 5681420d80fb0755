// Fast eager entry points into fastopt's multi-tensor ops, exposed by fastopt._C.
#pragma once

#include <Python.h>

namespace fastopt {

// adam_step_eager(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor,
//                 beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
//                 grad_scale, found_inf) -> None, or NotImplemented where the caller must use
// torch.ops.fastopt.adam_step_ instead (tensor subclasses, torch function modes).
PyObject* adam_step_eager(PyObject* self, PyObject* args);

}  // namespace fastopt
