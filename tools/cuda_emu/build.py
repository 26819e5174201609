"""Builds the emulated CUDA kernels (translate.py + emu_runtime.h) as a library of CPU kernels.

`load()` translates csrc/**/*_cuda.cu, compiles them with the validation files they call, and
loads the result with torch.ops.load_library: from then on the pncc ops on CPU tensors run the
CUDA code under emulation (the CPU kernels of pncc_cuda._C are overridden; torch warns once per
op). Load pncc_cuda first.

Environment: EMU_SANITIZE=address builds with AddressSanitizer (run python with
LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0).
"""
import glob
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]


def translated_sources(out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for cu in sorted(glob.glob(str(REPO / "csrc" / "**" / "*_cuda.cu"), recursive=True)):
        dst = out_dir / (pathlib.Path(cu).stem + "_emu.cpp")
        subprocess.run([sys.executable, str(HERE / "translate.py"), cu, str(dst)], check=True,
                       stdout=subprocess.DEVNULL)
        sources.append(str(dst))
    return sources


def load(verbose=False):
    import torch
    from torch.utils import cpp_extension

    sanitize = os.environ.get("EMU_SANITIZE", "")
    name = "pncc_cuda_emu" + (f"_{sanitize}" if sanitize else "")
    out_dir = REPO / "build" / "cuda_emu" / name
    sources = translated_sources(out_dir / "src")
    sources += [str(REPO / "csrc" / "corr" / "corr_check.cpp"),
                str(REPO / "csrc" / "raster" / "raster_check.cpp")]
    cflags = ["-O2", "-g", "-ffp-contract=off", "-Wall"]
    ldflags = []
    if sanitize:
        cflags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]
        ldflags += [f"-fsanitize={sanitize}"]
    path = cpp_extension.load(
        name=name,
        sources=sources,
        extra_include_paths=[str(HERE), str(REPO / "csrc")],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=str(out_dir),
        is_python_module=False,
        verbose=verbose,
    )
    return path


if __name__ == "__main__":
    sys.path[:0] = [str(REPO)]
    import pncc_cuda  # noqa: F401  (schemas first)
    print(load(verbose=True))
