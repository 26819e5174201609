"""corr_warp's CPU path choice (csrc/corr/corr_cpu_path.h): the AVX-512 kernels or ATen's GEMMs,
chosen by measuring once per shape class, cached, forced by PNCC_CORR_SIMD or the
_corr_cpu_path_mode debug op, and actually used (the tile-product counters of
_corr_cpu_path_stats say which path ran)."""
import os
import subprocess
import sys

import pytest
import torch
from test_corr import _forward_backward, _inputs, assert_accuracy

import pncc_cuda

OPS = torch.ops.pncc


def stats():
    available, calibrations, simd, aten = OPS._corr_cpu_path_stats()
    return dict(available=bool(available), calibrations=calibrations, simd=simd, aten=aten)


SIMD_AVAILABLE = stats()["available"]
needs_simd = pytest.mark.skipif(not SIMD_AVAILABLE, reason="this CPU has no AVX-512F")


@pytest.fixture
def path_mode():
    """Sets the path mode for one test; restores the previous one afterwards."""
    previous = OPS._corr_cpu_path_mode("")
    yield OPS._corr_cpu_path_mode
    OPS._corr_cpu_path_mode(previous)


def test_choice_is_measured_once_per_shape_class(path_mode):
    path_mode("recalibrate")  # auto, with earlier calibrations forgotten
    before = stats()
    first = OPS._corr_cpu_path(48, 40)
    assert first in ("simd", "aten")
    after = stats()
    # No AVX-512: nothing to choose between, nothing measured.
    assert after["calibrations"] - before["calibrations"] == (1 if SIMD_AVAILABLE else 0)
    if not SIMD_AVAILABLE:
        assert first == "aten"
    # C and Cv are rounded up to powers of two: (64, 33) is the same class as (48, 40).
    assert OPS._corr_cpu_path(64, 33) == first
    assert stats()["calibrations"] == after["calibrations"]
    # corr_warp itself takes the cached choice, measuring nothing more.
    q, k, v = _inputs(1, 40, 90, 48, 40)
    pncc_cuda.corr_warp(q, k, v, 0.05)
    done = stats()
    assert done["calibrations"] == after["calibrations"]
    assert done[first] > after[first]
    assert done["aten" if first == "simd" else "simd"] == after["aten" if first == "simd" else "simd"]
    # Another class is measured on its own.
    OPS._corr_cpu_path(8, 3)
    assert stats()["calibrations"] - done["calibrations"] == (1 if SIMD_AVAILABLE else 0)


@pytest.mark.parametrize("mode", ["aten", pytest.param("simd", marks=needs_simd)])
def test_forced_path_is_the_one_that_runs(path_mode, mode):
    path_mode(mode)
    assert OPS._corr_cpu_path(256, 256) == mode
    other = "simd" if mode == "aten" else "aten"
    before = stats()
    q, k, v = _inputs(2, 300, 700, 16, 5)
    grad_out = torch.randn(2, 300, 5, generator=torch.Generator().manual_seed(2))
    _forward_backward(pncc_cuda.corr_warp, q, k, v, grad_out, temperature=0.02)
    after = stats()
    assert after[mode] > before[mode]
    assert after[other] == before[other]
    assert after["calibrations"] == before["calibrations"]
    # float64 never takes the AVX-512 kernels, whatever the mode.
    _forward_backward(pncc_cuda.corr_warp, q.double(), k.double(), v.double(), grad_out.double(),
                      temperature=0.02)
    assert stats()["simd"] == after["simd"]


@pytest.mark.parametrize("mode", ["aten", pytest.param("simd", marks=needs_simd)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_path_agrees_with_the_reference(path_mode, mode, dtype):
    path_mode(mode)
    q, k, v = _inputs(2, 130, 600, 40, 7, dtype=dtype)
    assert_accuracy(q, k, v, temperature=0.01)


@needs_simd
def test_the_two_paths_agree_with_each_other(path_mode):
    q, k, v = _inputs(1, 257, 1030, 32, 9)
    grad_out = torch.randn(1, 257, 9, generator=torch.Generator().manual_seed(4))
    results = {}
    for mode in ("simd", "aten"):
        path_mode(mode)
        results[mode] = _forward_backward(pncc_cuda.corr_warp, q, k, v, grad_out,
                                          temperature=0.01)
    for name, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), results["simd"], results["aten"]):
        # Different GEMMs: not the same bits, but the same values to fp32 accuracy.
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item()), name


def test_auto_choice_is_the_same_for_every_thread_count(path_mode, num_threads):
    path_mode("auto")
    q, k, v = _inputs(2, 300, 1100, 16, 5)
    grad_out = torch.randn(2, 300, 5, generator=torch.Generator().manual_seed(3))
    results = []
    for n in (1, 2, 3):
        num_threads(n)
        results.append(_forward_backward(pncc_cuda.corr_warp, q, k, v, grad_out, temperature=0.01))
    assert stats()["calibrations"] >= (1 if SIMD_AVAILABLE else 0)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_bad_mode_is_a_one_line_error(path_mode):
    with pytest.raises(RuntimeError, match="must be 'auto', 'simd', 'aten' or 'recalibrate', not 'fast'"):
        path_mode("fast")
    with pytest.raises(RuntimeError, match="positive channel counts"):
        OPS._corr_cpu_path(0, 3)


def _in_fresh_process(env_value, code):
    env = dict(os.environ, PNCC_CORR_SIMD=env_value)
    # (conftest puts this checkout's build first on the path, as under pytest)
    return subprocess.run([sys.executable, "-c", "import conftest, pncc_cuda, torch\n" + code],
                          env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))


@pytest.mark.parametrize("env_value, expected", [
    ("0", "aten"), pytest.param("1", "simd", marks=needs_simd), ("auto", None)])
def test_environment_variable_sets_the_mode(env_value, expected):
    code = ("print(torch.ops.pncc._corr_cpu_path_mode(''), torch.ops.pncc._corr_cpu_path(256, 256),"
            " torch.ops.pncc._corr_cpu_path_stats()[1])")
    result = _in_fresh_process(env_value, code)
    assert result.returncode == 0, result.stderr[-2000:]
    mode, path, calibrations = result.stdout.split()
    if expected is None:  # auto: measured (when there is a choice)
        assert mode == "auto" and path in ("simd", "aten")
        assert int(calibrations) == (1 if SIMD_AVAILABLE else 0)
    else:  # forced: nothing measured
        assert (mode, path, int(calibrations)) == (expected, expected, 0)


def test_bad_environment_variable_is_a_one_line_error():
    q = "q = torch.randn(1, 4, 3); pncc_cuda.corr_warp(q, q, q, 0.1)"
    result = _in_fresh_process("yes", q)
    assert result.returncode != 0
    assert "PNCC_CORR_SIMD must be 0 (ATen GEMMs), 1 (AVX-512 kernels) or auto, not 'yes'" in (
        result.stderr)
