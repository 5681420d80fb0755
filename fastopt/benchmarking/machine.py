"""The machine a benchmark ran on, named in every table: CPU model, instruction set, threads,
GPU model, torch version."""

from __future__ import annotations

import platform

import torch

from .. import _extension


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (/proc/cpuinfo on Linux), else the platform's
    processor string."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: str) -> str:
    """One line naming what ran: on the CPU its model, the instruction set fastopt's kernels use
    and the threads; on CUDA the GPU's model; and the torch version.

        >>> machine_description("cpu")  # doctest: +SKIP
        'Intel(R) Xeon(R) Processor, 2 threads, avx512 kernels, torch 2.14.1+cu130'
    """
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    isa = _extension.cpu_module().active_cpu_isa()
    return (
        f"{cpu_model()}, {torch.get_num_threads()} threads, {isa} kernels, "
        f"torch {torch.__version__}"
    )
