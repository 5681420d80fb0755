// The CUDA driver of every rule's op, run_step_on_cuda<Rule> (optim/cuda/multi_tensor_step.cuh).
//
// A rule has one kernel per variant and scaling, each handling every storage layout: the longest
// compiles of the CUDA build (and of its emulation). Each rule's are therefore compiled in a file
// of their own (step_kernels_<rule>.cu), declared here, so that a build compiles them in
// parallel. A rule without such a file still works: its kernels are then compiled where it is
// registered.
#pragma once

#include "optim/cuda/multi_tensor_step.cuh"
#include "optim/step_ops.h"

namespace fastopt::cuda {

extern template void run_step_on_cuda<AdamRule>(const StepCall<AdamRule>&);
extern template void run_step_on_cuda<RmspropRule>(const StepCall<RmspropRule>&);
extern template void run_step_on_cuda<AdagradRule>(const StepCall<AdagradRule>&);
extern template void run_step_on_cuda<AdadeltaRule>(const StepCall<AdadeltaRule>&);

}  // namespace fastopt::cuda
