"""The float16/bfloat16 paths of corr_warp's CUDA kernels (csrc/corr/corr_kernels.cuh).

test_corr.py's stress cases run in float32, which on CUDA takes the SIMT kernel. These run the
same accuracy rule in float16 and bfloat16, on the shapes that select each tensor-core kernel
instantiation (channels padded to 64 or 256, value windows of 16 to 264 channels, several
windows, the SIMT fallbacks beyond), plus the corner cases the tensor-core backward handles on its
own: a single key, the deterministic dQ pass, value rows that are not 16-byte aligned; and the
fp32 path's bitwise repeatability. On the CPU they check the CPU kernels; under tools/cuda_emu
(whose plugin makes "cpu" run the CUDA code) and on a GPU they check the CUDA kernels.
"""
import pytest
import torch
from conftest import devices
from test_corr import _forward_backward, _inputs, assert_accuracy

import pncc_cuda

LOW_PRECISION = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize(
    "shape",
    [
        (2, 70, 130, 256, 258),  # the benchmark's channels: C padded to 256, one 264 window
        (2, 65, 66, 40, 33),     # C padded to 64; Cv just over a 32 window
        (1, 33, 70, 16, 300),    # two forward windows; the SIMT backward (Cv > 264)
        (1, 33, 70, 7, 300),     # bf16 rows of C < 16 split into hi + lo, SIMT backward too
        (1, 20, 30, 272, 8),     # the SIMT backward (C > 256)
    ],
)
def test_low_precision_shapes(device, dtype, shape):
    q, k, v = _inputs(*shape, dtype=dtype, device=device)
    assert_accuracy(q, k, v, temperature=0.05)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("n", [1, 2, 97])
def test_low_precision_stress_sizes(device, dtype, n):
    batch = {1: 64, 2: 64, 97: 4}[n]
    q, k, v = _inputs(batch, n, n, 8, 3, seed=n, dtype=dtype, device=device)
    assert_accuracy(q, k, v, temperature=0.01)


# float16 at scale 1e-6 is left out: the exact dL/dq there reaches 6.7e4, past float16's 65504.
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("temperature", [1.0, 0.001])
@pytest.mark.parametrize(
    "dtype, scale", [(torch.float16, 1e3), (torch.bfloat16, 1e3), (torch.bfloat16, 1e-6)]
)
def test_low_precision_stress_temperature_and_scale(device, dtype, scale, temperature):
    q, k, v = _inputs(8, 17, 97, 8, 3, scale=scale, dtype=dtype, device=device)
    assert_accuracy(q, k, v, temperature=temperature)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float32])
def test_single_key_gradients_are_exactly_zero(device, dtype):
    # Softmax over one key is the constant 1: dL/dq and dL/dk are exactly 0 and dL/dV is the sum
    # of dO over the queries. D = rowsum(dO * O) and dP = dO . V round differently, so a kernel
    # that does not special-case one key returns dL/dq of about 1e-7 instead.
    q, k, v = _inputs(4, 50, 1, 24, 6, dtype=dtype, device=device)
    grad_out = torch.randn(4, 50, 6, dtype=dtype, device=device)
    out, gq, gk, gv = _forward_backward(pncc_cuda.corr_warp, q, k, v, grad_out, temperature=0.01)
    assert torch.equal(out, v.expand(4, 50, 6))
    assert not gq.any() and not gk.any()
    torch.testing.assert_close(gv, grad_out.sum(1, keepdim=True))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_deterministic_mode_backward(device, dtype):
    # Under torch.use_deterministic_algorithms(True) the tensor-core backward takes its dQ pass
    # instead of atomics: as accurate, and bitwise repeatable.
    q, k, v = _inputs(2, 70, 90, 40, 10, dtype=dtype, device=device)
    grad_out = torch.randn(2, 70, 10, dtype=dtype, device=device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert_accuracy(q, k, v, temperature=0.05)
        first = _forward_backward(pncc_cuda.corr_warp, q, k, v, grad_out, temperature=0.05)
        again = _forward_backward(pncc_cuda.corr_warp, q, k, v, grad_out, temperature=0.05)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    default = _forward_backward(pncc_cuda.corr_warp, q, k, v, grad_out, temperature=0.05)
    for a, b in zip(first, default):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_unaligned_value_rows(device, dtype):
    # A contiguous value whose data starts 2 bytes past a 16-byte boundary: the kernels' 16-byte
    # copies must go through their padded copy, with the same results.
    q, k, v = _inputs(2, 30, 40, 16, 8, dtype=dtype, device=device)
    storage = torch.empty(v.numel() + 1, dtype=dtype, device=device)
    shifted = storage[1:].view(v.shape)
    shifted.copy_(v)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    grad_out = torch.randn(2, 30, 8, dtype=dtype, device=device)
    a = _forward_backward(pncc_cuda.corr_warp, q, k, shifted, grad_out, temperature=0.05)
    b = _forward_backward(pncc_cuda.corr_warp, q, k, v, grad_out, temperature=0.05)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", devices())
def test_float32_is_repeatable(device):
    # The fp32 path (the register-tiled SIMT kernel on CUDA) has no atomics in either direction:
    # every output element is written by one thread, and the row maxima, sums and D reduce in a
    # fixed order, so two runs agree bitwise in the default (non-deterministic) mode. The shape
    # takes two key tiles, two channel chunks and the wide output window (Cv = 80).
    q, k, v = _inputs(2, 70, 90, 40, 80, device=device)
    grad_out = torch.randn(2, 70, 80, device=device)
    first = _forward_backward(pncc_cuda.corr_warp, q, k, v, grad_out, temperature=0.05)
    again = _forward_backward(pncc_cuda.corr_warp, q, k, v, grad_out, temperature=0.05)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert_accuracy(q, k, v, temperature=0.05)
