"""Build script for pncc-cuda: the compiled op library `pncc_cuda._C` plus the `reenact` package.

Build configuration (printed at build time):
  FORCE_CUDA=1            compile the CUDA sources even when no GPU is visible (CI does this).
  FORCE_CUDA=0            skip the CUDA sources explicitly (a CPU-only build on purpose).
  (unset)                 compile CUDA when torch was built with CUDA and nvcc is found.
  TORCH_CUDA_ARCH_LIST    respected; when unset and no GPU is visible it defaults to "8.0;9.0"
                          (torch's own default crashes without a GPU).
  PNCC_DEBUG=1            -O0 -g, for debuggers and sanitizers.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def _locate_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin fools it."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            return
    nvcc = shutil.which("nvcc")
    if nvcc:
        with open(nvcc, "rb") as f:
            head = f.read(512)
        # Follow a one-line `exec /path/to/nvcc` wrapper to the real toolkit.
        for token in head.decode(errors="ignore").split():
            if token.endswith("/bin/nvcc") and os.path.exists(token):
                os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(token))
                return


_locate_cuda_home()

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension is imported)
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _want_cuda():
    force = os.environ.get("FORCE_CUDA")
    if force == "1":
        if CUDA_HOME is None:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME.")
        if torch.version.cuda is None:
            sys.exit("FORCE_CUDA=1 but the installed torch is a CPU-only build.")
        return True, "FORCE_CUDA=1"
    if force == "0":
        return False, "FORCE_CUDA=0"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME, or FORCE_CUDA=1 to make this an error)"
    return True, f"torch {torch.version.cuda} + nvcc at {CUDA_HOME}"


def _extension():
    with_cuda, reason = _want_cuda()
    debug = os.environ.get("PNCC_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    # -ffp-contract=off: the coverage test must evaluate edge functions bit-identically to the
    # reference; a fused multiply-add would round differently (see csrc/common/host_device.h).
    # torch supplies -std=c++20 itself (ATen requires it).
    cxx = opt + ["-fopenmp", "-ffp-contract=off"]
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(HERE, "csrc")]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
        extra["nvcc"] = opt + ["-lineinfo", "--expt-relaxed-constexpr"]
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    print(
        "pncc-cuda build configuration:\n"
        f"  torch            {torch.__version__} (CUDA {torch.version.cuda})\n"
        f"  CUDA sources     {'yes' if with_cuda else 'no'} ({reason})\n"
        f"  CUDA_HOME        {CUDA_HOME}\n"
        f"  arch list        {os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)') if with_cuda else '-'}\n"
        f"  optimisation     {' '.join(opt)}\n"
        f"  sources          {len(sources)} files",
        flush=True,
    )
    return ext_cls(
        name="pncc_cuda._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        # The op library exposes no Python functions of its own: only TORCH_LIBRARY registrations.
        py_limited_api=False,
    )


setup(
    packages=["pncc_cuda"] + find_packages("python"),
    package_dir={"pncc_cuda": "pncc_cuda", "reenact": "python/reenact"},
    # Derived data read at run time: the (model, detector) fit calibrations, and the built-in
    # mediapipe face model's mean shape (tools/make_mediapipe_face.py makes it).
    package_data={"reenact.face3d": ["calibrations/*.json", "data/*.npz"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
