"""The host emulator of the CUDA kernels (tools/cuda_emu) checked against the PTX ISA itself.

tools/cuda_emu/tests/test_ptx_emu.cpp checks the emulated mma.sync m16n8k16, ldmatrix and
cp.async wrappers of csrc/common/ptx.cuh against fragment layouts worked out by hand, so that the
kernels' emulated runs (the CUDA op tests under tools.cuda_emu.pytest_plugin) can be trusted.
"""
import os
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
EMU = REPO / "tools" / "cuda_emu"


def build_emulator_test(name, out_dir):
    import torch

    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler (g++ or $CXX) to build the emulator tests")
    torch_dir = pathlib.Path(torch.__file__).parent
    exe = out_dir / name
    cmd = [compiler, "-std=c++20", "-O1", "-g", "-ffp-contract=off", "-Wall", f"-I{EMU}",
           f"-I{REPO / 'csrc'}", "-isystem", str(torch_dir / "include"),
           str(EMU / "tests" / f"{name}.cpp"), f"-L{torch_dir / 'lib'}",
           f"-Wl,-rpath,{torch_dir / 'lib'}", "-lc10", "-lpthread", "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def test_ptx_wrappers_follow_the_ptx_isa_layouts(tmp_path):
    exe = build_emulator_test("test_ptx_emu", tmp_path)
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "ok: 0 failed checks" in result.stdout
