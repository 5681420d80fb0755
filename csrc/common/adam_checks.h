// The input checks of fastopt::adam_step_, shared by its CPU and CUDA kernels.
#pragma once

#include "common/optimizer_checks.h"
#include "op_signatures.h"

namespace fastopt {

inline void check_adam_tensors(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                               at::TensorList steps, bool amsgrad, c10::DeviceType device_type) {
  TORCH_CHECK(amsgrad || max_exp_avg_sqs.empty(), kAdamStepName,
              ": max_exp_avg_sqs must be empty when amsgrad=False");
  if (amsgrad) {
    check_optimizer_tensors(kAdamStepName, params,
                            {{"grads", grads},
                             {"exp_avgs", exp_avgs},
                             {"exp_avg_sqs", exp_avg_sqs},
                             {"max_exp_avg_sqs", max_exp_avg_sqs}},
                            steps, device_type);
  } else {
    check_optimizer_tensors(
        kAdamStepName, params,
        {{"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}, steps,
        device_type);
  }
}

}  // namespace fastopt
