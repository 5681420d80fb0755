"""Builds fastopt's two extensions: `fastopt._C` (CPU kernels, always) and `fastopt._C_cuda`
(CUDA kernels, whenever torch is a CUDA build and nvcc is found; no GPU is needed to compile).

Environment:
  FASTOPT_CUDA=0          skip the CUDA extension (quick CPU-only builds)
  FASTOPT_CUDA_EMULATION=0  skip `fastopt._C_cuda_emulation`, the CUDA optimizer kernels compiled
                          for the CPU, which the tests run where there is no GPU (built with the
                          CUDA extension otherwise; fastopt itself never loads it)
  CUDA_HOME, CUDA_PATH    the CUDA toolkit (default: /usr/local/cuda, else where nvcc is)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default: "8.0;9.0+PTX")
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # PTX lets newer GPUs JIT-compile the sm_90 code


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: an explicit CUDA_HOME, else /usr/local/cuda, else nvcc's parent.

    nvcc may be a wrapper script outside the toolkit (as /usr/local/bin/nvcc is on our CI), so
    /usr/local/cuda is tried before the location of the nvcc found on PATH.
    """
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return str(Path(os.path.realpath(nvcc)).parent.parent) if nvcc else None


cuda_home = find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WANT_CUDA = os.environ.get("FASTOPT_CUDA", "1") != "0"
BUILD_CUDA = WANT_CUDA and torch.version.cuda is not None and cuda_home is not None
BUILD_CUDA_EMULATION = BUILD_CUDA and os.environ.get("FASTOPT_CUDA_EMULATION", "1") != "0"

COMMON_CXX_FLAGS = [
    "-O3",
    "-fopenmp",
    # Lets sqrt vectorize: the kernels never rely on errno.
    "-fno-math-errno",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    # GCC notes that passing vectors by value changed ABI between its versions and instruction
    # sets. It cannot matter here: the vector types of the CPU kernels (the block-sparse tiles, the
    # optimizer rules' AVX-512 lanes) pass between functions inlined into one variant only. A
    # pragma in their headers would not do: GCC reports it where a template is instantiated.
    "-Wno-psabi",
]


def nvidia_pip_include_dirs() -> list[str]:
    """Headers of the `nvidia-*` pip packages: torch's CUDA headers include cusparse.h and friends,
    which live there rather than in the system toolkit."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def write_build_info() -> None:
    """Records what was built, read by `fastopt._extension` before it loads the binaries."""
    info = {
        "TORCH_VERSION": torch.__version__,
        "CUDA_BUILT": BUILD_CUDA,
        "CUDA_VERSION": torch.version.cuda if BUILD_CUDA else None,
        "CUDA_ARCHS": os.environ["TORCH_CUDA_ARCH_LIST"] if BUILD_CUDA else None,
        "CUDA_EMULATION_BUILT": BUILD_CUDA_EMULATION,
    }
    lines = ['"""Written by setup.py at build time; do not edit."""', ""]
    lines += [f"{key} = {value!r}" for key, value in info.items()]
    (ROOT / "fastopt" / "_build_info.py").write_text("\n".join(lines) + "\n")


def cuda_emulation_sources() -> list[str]:
    """One C++ file per .cu file of csrc/optim/cuda that includes it, so that the host compiler
    builds the kernels' own source for the emulation (setuptools hands .cu files to nvcc). The
    layers' CUDA code (csrc/cuda) is not emulated: it is not free of thread cooperation."""
    folder = Path("build") / "cuda_emulation"
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for cu in sorted(Path("csrc/optim/cuda").glob("*.cu")):
        wrapper = folder / f"{cu.stem}.cpp"
        text = f'#include "{cu.relative_to("csrc").as_posix()}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:  # keep the build incremental
            wrapper.write_text(text)
        sources.append(str(wrapper))
    return sources


def extensions():
    # A source belongs to the CUDA extension when it sits in a folder named `cuda`
    # (csrc/cuda, csrc/optim/cuda), to the CPU extension otherwise (the dispatch glue in csrc/
    # itself, csrc/cpu, csrc/optim/cpu, csrc/layers/cpu).
    sources = sorted(
        glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True)
    )
    cuda_sources = [s for s in sources if "cuda" in Path(s).parent.parts]
    cpu_sources = [s for s in sources if s not in cuda_sources]
    exts = [
        CppExtension(
            "fastopt._C",
            cpu_sources,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": COMMON_CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    ]
    if BUILD_CUDA:
        exts.append(
            CUDAExtension(
                "fastopt._C_cuda",
                cuda_sources,
                include_dirs=[str(ROOT / "csrc")] + nvidia_pip_include_dirs(),
                extra_compile_args={
                    "cxx": COMMON_CXX_FLAGS,
                    "nvcc": ["-O3", "-lineinfo"],
                },
            )
        )
    if BUILD_CUDA_EMULATION:
        exts.append(
            CppExtension(
                "fastopt._C_cuda_emulation",
                cuda_emulation_sources(),
                include_dirs=[str(ROOT / "csrc"), os.path.join(cuda_home, "include")],
                extra_compile_args={
                    "cxx": COMMON_CXX_FLAGS
                    # Hidden: its fastopt::cuda symbols must never stand in for _C_cuda's.
                    + ["-DFASTOPT_CUDA_EMULATION", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
                },
            )
        )
    return exts


write_build_info()
setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
