"""corr_warp and render_pncc under torch.autocast: their Autocast/AutocastCPU kernels cast the
floating inputs to the widest of their dtypes (render_pncc: at least float32, its kernels' floor)
and run the op below autocast, so mixed-dtype inputs that the ops refuse outside autocast work,
and gradients reach every input in its own dtype."""
import pytest
import torch
from conftest import devices

import pncc_cuda
from pncc_cuda.testing import face_mesh

AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}


def qkv(device, dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((2, 40, 16), (2, 56, 16), (2, 56, 5))
    return [torch.randn(*s, generator=g).to(device=device, dtype=d) for s, d in zip(shapes, dtypes)]


@pytest.mark.parametrize("device", devices())
def test_corr_warp_casts_mixed_inputs_to_the_widest(device):
    low = AUTOCAST_DTYPE[device]
    q, k, v = qkv(device, (low, low, torch.float32))
    with pytest.raises(TypeError, match="must have the dtype of query"):
        pncc_cuda.corr_warp(q, k, v, 0.01)  # outside autocast: refused
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    with torch.autocast(device, dtype=low):
        out = pncc_cuda.corr_warp(*leaves, 0.01)
    assert out.dtype == torch.float32
    expected = pncc_cuda.corr_warp(q.float(), k.float(), v, 0.01)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.square().sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("device", devices())
def test_corr_warp_keeps_one_dtype_as_it_is(device):
    # Nothing to promote: the op runs in its inputs' dtype, never downcast to the autocast dtype.
    q, k, v = qkv(device, (torch.float32,) * 3)
    with torch.autocast(device, dtype=AUTOCAST_DTYPE[device]):
        out = pncc_cuda.corr_warp(q, k, v, 0.01)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pncc_cuda.corr_warp(q, k, v, 0.01), rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
def test_render_pncc_casts_to_at_least_float32(device):
    mesh = face_mesh(num_faces=2000, size=64)
    vertices = mesh.batch(1).to(device)
    faces, ncc = mesh.faces.to(device), mesh.ncc.to(device)
    low = AUTOCAST_DTYPE[device]
    with pytest.raises(TypeError):
        pncc_cuda.render_pncc(vertices, faces, ncc.to(low), 64, 64)  # outside autocast: refused
    expected, expected_mask = pncc_cuda.render_pncc(vertices, faces, ncc.to(low).float(), 64, 64)
    with torch.autocast(device, dtype=low):
        pncc, mask = pncc_cuda.render_pncc(vertices, faces, ncc.to(low), 64, 64)  # fp32 with bf16/fp16
        both_low = pncc_cuda.render_pncc(vertices.to(low), faces, ncc.to(low), 64, 64)[0]
    assert pncc.dtype == torch.float32 and both_low.dtype == torch.float32  # its kernels' floor
    torch.testing.assert_close(pncc, expected, rtol=0, atol=0)
    torch.testing.assert_close(mask, expected_mask, rtol=0, atol=0)
    assert expected.abs().sum() > 0  # the face covers pixels: the comparison means something


def test_corr_warp_autocast_traces_under_compile():
    # torch.compile(fullgraph=True) traces the autocast region through the Autocast kernel and the
    # fake kernel (no graph break) and computes what eager mode does.
    q, k, v = qkv("cpu", (torch.bfloat16, torch.bfloat16, torch.float32))

    def warp(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return pncc_cuda.corr_warp(q, k, v, 0.01)

    compiled = torch.compile(warp, fullgraph=True, backend="aot_eager")(q, k, v)
    assert compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, warp(q, k, v), rtol=0, atol=0)
