"""corr_warp's CPU path choice (csrc/corr/corr_cpu_path.h): the AVX-512 kernels or ATen's GEMMs in
fp32, or the bf16 kernels (AVX512-BF16, on AMX tiles where the CPU has them) for bfloat16 inputs, chosen by measuring once per shape class,
cached, forced by PNCC_CORR_SIMD or the _corr_cpu_path_mode debug op, and actually used (the
tile-product counters of _corr_cpu_path_stats say which path ran)."""
import os
import subprocess
import sys

import pytest
import torch
from test_corr import _forward_backward, _inputs, assert_accuracy

import pncc_cuda

OPS = torch.ops.pncc


def stats():
    available, calibrations, simd, aten, bf16_available, bf16, amx = OPS._corr_cpu_path_stats()
    return dict(available=bool(available), calibrations=calibrations, simd=simd, aten=aten,
                bf16_available=bool(bf16_available), bf16=bf16, amx=bool(amx))


SIMD_AVAILABLE = stats()["available"]
BF16_AVAILABLE = stats()["bf16_available"]
needs_simd = pytest.mark.skipif(not SIMD_AVAILABLE, reason="this CPU has no AVX-512F")
needs_bf16 = pytest.mark.skipif(not BF16_AVAILABLE, reason="this CPU has no AVX512-BF16")
AMX_IN_USE = stats()["amx"]
needs_amx = pytest.mark.skipif(not AMX_IN_USE, reason="this CPU has no AMX-BF16 (or it is off)")
PATHS = ("simd", "aten", "bf16")


def test_choice_is_measured_once_per_shape_class(corr_path_mode):
    corr_path_mode("recalibrate")  # auto, with earlier calibrations forgotten
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
    assert all(done[p] == after[p] for p in PATHS if p != first)
    # Another class is measured on its own.
    OPS._corr_cpu_path(8, 3)
    assert stats()["calibrations"] - done["calibrations"] == (1 if SIMD_AVAILABLE else 0)


@needs_bf16
def test_bf16_inputs_are_measured_as_a_class_of_their_own(corr_path_mode):
    corr_path_mode("recalibrate")
    before = stats()
    fp32 = OPS._corr_cpu_path(48, 40)
    chosen = OPS._corr_cpu_path(48, 40, True)
    # One calibration for the fp32 class, one for bf16 inputs (bf16 kernels against that path).
    assert stats()["calibrations"] - before["calibrations"] == 2
    assert chosen in ("bf16", fp32)
    assert OPS._corr_cpu_path(64, 33, True) == chosen
    q, k, v = _inputs(1, 40, 90, 48, 40, dtype=torch.bfloat16)
    after = stats()
    pncc_cuda.corr_warp(q, k, v, 0.05)
    done = stats()
    assert done["calibrations"] == after["calibrations"]
    assert done[chosen] > after[chosen]
    assert all(done[p] == after[p] for p in PATHS if p != chosen)


MODES = ["aten", pytest.param("simd", marks=needs_simd), pytest.param("bf16", marks=needs_bf16)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_path_is_the_one_that_runs(corr_path_mode, mode, dtype):
    corr_path_mode(mode)
    # The bf16 mode takes the bf16 kernels for bfloat16 inputs, the AVX-512 ones for the others.
    expected = "simd" if mode == "bf16" and dtype != torch.bfloat16 else mode
    assert OPS._corr_cpu_path(256, 256, dtype == torch.bfloat16) == expected
    before = stats()
    q, k, v = _inputs(2, 300, 700, 16, 5, dtype=dtype)
    grad_out = torch.randn(2, 300, 5, generator=torch.Generator().manual_seed(2))
    _forward_backward(pncc_cuda.corr_warp, q, k, v, grad_out, temperature=0.02)
    after = stats()
    assert after[expected] > before[expected]
    assert all(after[p] == before[p] for p in PATHS if p != expected)
    assert after["calibrations"] == before["calibrations"]
    # float64 never takes the project's kernels, whatever the mode.
    _forward_backward(pncc_cuda.corr_warp, q.double(), k.double(), v.double(), grad_out.double(),
                      temperature=0.02)
    assert stats()["simd"] == after["simd"] and stats()["bf16"] == after["bf16"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_path_agrees_with_the_reference(corr_path_mode, mode, dtype):
    corr_path_mode(mode)
    q, k, v = _inputs(2, 130, 600, 40, 7, dtype=dtype)
    assert_accuracy(q, k, v, temperature=0.01)


@needs_simd
def test_the_two_paths_agree_with_each_other(corr_path_mode):
    q, k, v = _inputs(1, 257, 1030, 32, 9)
    grad_out = torch.randn(1, 257, 9, generator=torch.Generator().manual_seed(4))
    results = {}
    for mode in ("simd", "aten"):
        corr_path_mode(mode)
        results[mode] = _forward_backward(pncc_cuda.corr_warp, q, k, v, grad_out,
                                          temperature=0.01)
    for name, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), results["simd"], results["aten"]):
        # Different GEMMs: not the same bits, but the same values to fp32 accuracy.
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item()), name


@pytest.mark.parametrize("mode", ["auto", pytest.param("bf16", marks=needs_bf16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_are_the_same_for_every_thread_count(corr_path_mode, num_threads, dtype, mode):
    corr_path_mode(mode)
    q, k, v = _inputs(2, 300, 1100, 16, 5, dtype=dtype)
    grad_out = torch.randn(2, 300, 5, generator=torch.Generator().manual_seed(3)).to(dtype)
    results = []
    for n in (1, 2, 3):
        num_threads(n)
        results.append(_forward_backward(pncc_cuda.corr_warp, q, k, v, grad_out, temperature=0.01))
    assert stats()["calibrations"] >= (1 if SIMD_AVAILABLE else 0)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_bad_mode_is_a_one_line_error(corr_path_mode):
    with pytest.raises(RuntimeError,
                       match="must be 'auto', 'simd', 'aten', 'bf16' or 'recalibrate', not 'fast'"):
        corr_path_mode("fast")
    with pytest.raises(RuntimeError, match="positive channel counts"):
        OPS._corr_cpu_path(0, 3)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":")[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


@pytest.mark.skipif(not _cpu_flags() or os.environ.get("PNCC_CORR_AMX") == "0",
                    reason="no /proc/cpuinfo flags, or AMX turned off")
def test_bf16_products_run_on_amx_exactly_where_the_cpu_has_it():
    flags = _cpu_flags()
    expected = {"amx_bf16", "amx_tile", "avx512_bf16", "avx512bw"} <= set(flags)
    assert AMX_IN_USE == expected


@needs_amx
def test_amx_can_be_turned_off_and_vdpbf16ps_then_agrees_with_the_reference():
    # This process's bf16 path runs on AMX (test_each_path_agrees_with_the_reference checks it);
    # PNCC_CORR_AMX=0 puts a fresh process's on vdpbf16ps.
    code = ("from test_corr import _inputs, assert_accuracy\n"
            "torch.ops.pncc._corr_cpu_path_mode('bf16')\n"
            "q, k, v = _inputs(2, 130, 600, 40, 7, dtype=torch.bfloat16)\n"
            "assert_accuracy(q, k, v, temperature=0.01)\n"
            "print(torch.ops.pncc._corr_cpu_path_stats()[5:])")
    result = _in_fresh_process("auto", code, PNCC_CORR_AMX="0")
    assert result.returncode == 0, result.stderr[-2000:]
    bf16_products, amx = eval(result.stdout.strip())
    assert bf16_products > 0 and amx == 0


@needs_amx
def test_amx_products_and_onednn_share_threads(corr_path_mode):
    # Tile configuration is per thread state: corr_warp loads its own before its products and
    # releases it after, and oneDNN (SDPA's bf16 path, bf16 matmuls) must still get its results,
    # and corr_warp its own, whichever ran last on the thread.
    corr_path_mode("bf16")
    q, k, v = _inputs(2, 300, 700, 64, 32, dtype=torch.bfloat16)
    a = torch.randn(256, 512, generator=torch.Generator().manual_seed(5)).bfloat16()

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])

    expected_sdpa, expected_mm = sdpa(), a @ a.T
    expected_corr = pncc_cuda.corr_warp(q, k, v, 0.05)
    for _ in range(3):
        assert torch.equal(pncc_cuda.corr_warp(q, k, v, 0.05), expected_corr)
        assert torch.equal(sdpa(), expected_sdpa)
        assert torch.equal(pncc_cuda.corr_warp(q, k, v, 0.05), expected_corr)
        assert torch.equal(a @ a.T, expected_mm)


def _in_fresh_process(env_value, code, **more_env):
    env = dict(os.environ, PNCC_CORR_SIMD=env_value, **more_env)
    # (conftest puts this checkout's build first on the path, as under pytest)
    return subprocess.run([sys.executable, "-c", "import conftest, pncc_cuda, torch\n" + code],
                          env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))


@pytest.mark.parametrize("env_value, expected", [
    ("0", "aten"), pytest.param("1", "simd", marks=needs_simd),
    pytest.param("bf16", "bf16", marks=needs_bf16), ("auto", None)])
def test_environment_variable_sets_the_mode(env_value, expected):
    code = ("print(torch.ops.pncc._corr_cpu_path_mode(''),"
            " torch.ops.pncc._corr_cpu_path(256, 256, True), torch.ops.pncc._corr_cpu_path_stats()[1])")
    result = _in_fresh_process(env_value, code)
    assert result.returncode == 0, result.stderr[-2000:]
    mode, path, calibrations = result.stdout.split()
    if expected is None:  # auto: measured (when there is a choice; bf16 inputs: two classes)
        assert mode == "auto" and path in PATHS
        assert int(calibrations) == int(SIMD_AVAILABLE) + int(BF16_AVAILABLE)
    else:  # forced: nothing measured
        assert (mode, path, int(calibrations)) == (expected, expected, 0)


def test_bad_environment_variable_is_a_one_line_error():
    q = "q = torch.randn(1, 4, 3); pncc_cuda.corr_warp(q, q, q, 0.1)"
    result = _in_fresh_process("yes", q)
    assert result.returncode != 0
    assert ("PNCC_CORR_SIMD must be 0 (ATen GEMMs), 1 (AVX-512 kernels), bf16 (AVX512-BF16 kernels"
            " for bfloat16 inputs) or auto, not 'yes'") in result.stderr
