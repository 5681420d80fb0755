// The CUDA kernels of AdagradRule (see step_kernels.cuh for why a file per rule).
#include "optim/cuda/step_kernels.cuh"

namespace fastopt::cuda {

template void run_step_on_cuda<AdagradRule>(const StepCall<AdagradRule>&);

}  // namespace fastopt::cuda
