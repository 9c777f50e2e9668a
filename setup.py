"""Builds nat_ext._C: the CPU ops always, the CUDA ops when a toolkit and a CUDA build of torch
are present (or FORCE_CUDA=1). The sources are every *.cpp (and *.cu) under csrc/: the same
rule CMakeLists.txt follows, so there is no list of files to keep in step."""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home() -> str | None:
    """The toolkit root (the folder above nvcc's bin/): torch guesses it from PATH, which goes
    wrong when nvcc on PATH is a wrapper script outside the toolkit."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) and \
                os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def pip_cuda_include_dirs() -> list[str]:
    """Headers shipped in the pip 'nvidia' packages (cuBLAS, cuSPARSE, ...) that torch's CUDA
    headers include and a minimal toolkit may lack."""
    try:
        import nvidia  # namespace package installed with CUDA builds of torch
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# FORCE_CUDA=1: the CUDA ops or a failed build; FORCE_CUDA=0: CPU ops only (a quick build);
# unset: the CUDA ops when a toolkit and a CUDA build of torch are both there.
force_cuda = os.environ.get("FORCE_CUDA") == "1"
no_cuda = os.environ.get("FORCE_CUDA") == "0"
with_cuda = force_cuda or (not no_cuda and torch.version.cuda is not None and cuda_home is not None)
if force_cuda and cuda_home is None:
    sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the folder above nvcc's bin/")

cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
include_dirs = [os.path.join(ROOT, "csrc")]
# The sources are C++20 (std::barrier, std::atomic_ref in the host team): say so, since torch's
# builder passes its own default otherwise (-std=c++17 up to torch 2.11, c++20 later).
cxx_flags = ["-O3", "-std=c++20"]
if with_cuda:
    include_dirs += pip_cuda_include_dirs()
    ext = CUDAExtension(
        "nat_ext._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
    )
else:
    ext = CppExtension("nat_ext._C", cpp_sources, include_dirs=include_dirs,
                       extra_compile_args={"cxx": cxx_flags})

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
