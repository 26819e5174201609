"""The CPU rasterizer's triangle-culling variants (csrc/raster/raster_cull.h): picked at run time
by timing them, forced by PNCC_RASTER_SIMD, and bitwise identical to each other on every workload
and thread count. (The C++ test tests/cpp/test_raster_cull.cpp checks the variants' survivors and bounds
directly.)"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import pncc_cuda
from pncc_cuda.testing import face_mesh, random_triangles

VARIANTS = ("scalar", "avx2", "avx512")


def cpu_flags():
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


FLAGS = cpu_flags()
needs_cpuinfo = pytest.mark.skipif(FLAGS is None, reason="no /proc/cpuinfo to read the flags from")


def supported(variant):
    return variant == "scalar" or (FLAGS is not None and variant.replace("avx512", "avx512f") in FLAGS)


def workloads():
    """Outputs of rasterize and render_pncc on the workloads that stress culling: overlapping
    random triangles (float32 and float64), a face mesh with mostly sub-pixel triangles at 1 and
    2 threads, and vertices far outside the image or not finite."""
    outputs = {}
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        vertices, faces = random_triangles(333, 40, 56, generator=g, dtype=dtype)
        outputs[f"soup_{dtype}"] = pncc_cuda.rasterize(vertices.unsqueeze(0), faces, 40, 56)
    mesh = face_mesh(76073, size=96)
    previous = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outputs[f"face_{threads}"] = pncc_cuda.render_pncc(mesh.batch(2), mesh.faces, mesh.ncc,
                                                           96, 96)
    torch.set_num_threads(previous)
    vertices, faces = random_triangles(200, 32, 32, generator=g)
    vertices[::7, 0] = 1e9
    vertices[3::11, 1] = -1e9
    vertices[5::13, 0] = float("nan")
    vertices[6::17, 1] = float("inf")
    outputs["hostile"] = pncc_cuda.rasterize(vertices.unsqueeze(0), faces, 32, 32)
    return outputs


def _run_forced(variant, tmp_path):
    """workloads() in a fresh process with PNCC_RASTER_SIMD=variant -> (variant it reported,
    outputs)."""
    path = tmp_path / f"{variant}.pt"
    # (conftest puts this checkout's build first on the path, as under pytest)
    code = ("import conftest, torch, test_raster_cull as t\n"
            "forced = (torch.ops.pncc._raster_cpu_variant(), "
            "torch.ops.pncc._raster_cpu_calibration())\n"
            f"torch.save((forced, t.workloads()), {str(path)!r})\n")
    env = dict(os.environ, PNCC_RASTER_SIMD=variant)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(path, weights_only=True)  # strs, floats and tensors: no pickled code


@needs_cpuinfo
@pytest.mark.skipif(os.environ.get("PNCC_RASTER_SIMD", "auto") != "auto",
                    reason="PNCC_RASTER_SIMD forces a variant in this process")
def test_default_variant_is_the_fastest_of_the_calibration():
    # Chosen by timing every variant the CPU has (bit-identical outputs: only speed differs).
    chosen = torch.ops.pncc._raster_cpu_variant()
    seconds = dict(zip(VARIANTS, torch.ops.pncc._raster_cpu_calibration()))
    for variant in VARIANTS:
        assert (seconds[variant] > 0) == supported(variant), (variant, seconds)
    assert seconds[chosen] == min(t for t in seconds.values() if t > 0), (chosen, seconds)


@pytest.mark.parametrize("variant", [
    pytest.param(v, marks=pytest.mark.skipif(not supported(v), reason=f"this CPU lacks {v}"))
    for v in VARIANTS])
def test_forced_variant_runs_and_renders_bitwise_identically(variant, tmp_path):
    (reported, calibration), outputs = _run_forced(variant, tmp_path)
    assert reported == variant
    assert calibration == [-1.0] * 3  # a forced variant is not measured
    expected = workloads()  # this process: the default variant
    assert outputs.keys() == expected.keys()
    for name, tensors in expected.items():
        for got, want in zip(outputs[name], tensors):
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), (variant, name)
            assert torch.equal(got.isnan(), want.isnan()), (variant, name)


@pytest.mark.parametrize("value, message", [
    ("avx9", "PNCC_RASTER_SIMD must be auto, avx512, avx2 or scalar, not 'avx9'"),
    pytest.param("avx512", "PNCC_RASTER_SIMD=avx512: this CPU (or build) lacks avx512",
                 marks=pytest.mark.skipif(supported("avx512"), reason="this CPU has AVX-512")),
])
def test_bad_or_unsupported_variant_is_a_one_line_error(value, message):
    code = ("import conftest, torch, pncc_cuda\n"
            "pncc_cuda.rasterize(torch.rand(1, 3, 3) * 8, torch.tensor([[0, 1, 2]]), 8, 8)\n")
    env = dict(os.environ, PNCC_RASTER_SIMD=value)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            cwd=os.path.dirname(__file__))
    assert result.returncode != 0
    assert message in result.stderr
