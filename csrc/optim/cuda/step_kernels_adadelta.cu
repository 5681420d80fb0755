// The CUDA kernels of AdadeltaRule (see step_kernels.cuh for why a file per rule).
#include "optim/cuda/step_kernels.cuh"

namespace fastopt::cuda {

template void run_step_on_cuda<AdadeltaRule>(const StepCall<AdadeltaRule>&);

}  // namespace fastopt::cuda
