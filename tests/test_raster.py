"""Behaviour of the rasterizer ops (rasterize, interpolate, render_pncc), their backwards, and the
reliability items 1-4 and 6-8 of RELIABILITY.md. Every test runs against the CPU kernel and, when
a GPU is visible, the CUDA kernel; pncc_cuda.reference is the oracle."""
import time

import pytest
import torch

import pncc_cuda
from pncc_cuda import reference
from pncc_cuda.testing import face_mesh, random_triangles

from conftest import devices, load_face_model

DEVICES = devices()


def soup(num_faces=60, size=32, seed=0, dtype=torch.float32, batch=2):
    """Overlapping random triangles with random depths, a different layout per batch item."""
    g = torch.Generator().manual_seed(seed)
    verts, faces = zip(*(random_triangles(num_faces, size, size, g, dtype=dtype) for _ in range(batch)))
    return torch.stack(verts), faces[0]


def assert_raster_equal(got, want):
    for name, a, b in zip(("face_index", "bary", "depth"), got, want):
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differs"


# ---------------------------------------------------------------------------------------------
# Parity with the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rasterize_matches_reference_on_overlapping_layers(device, dtype):
    vertices, faces = soup(dtype=dtype)
    want = reference.rasterize_reference(vertices, faces, 32, 40)
    got = pncc_cuda.rasterize(vertices.to(device), faces.to(device), 32, 40)
    assert_raster_equal(got, want)
    covered = want[0] >= 0
    assert covered.float().mean() > 0.2, "the workload should cover a good part of the image"
    # Overlap: some pixels are inside several triangles, so the depth test decided something.
    layers = reference.rasterize_reference(vertices, faces[:30], 32, 40)[0]
    assert (layers != want[0]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_interpolate_and_render_pncc_match_reference(device):
    vertices, faces = soup()
    attributes = torch.rand(1, vertices.shape[1], 5, generator=torch.Generator().manual_seed(1))
    face_index, bary, _ = reference.rasterize_reference(vertices, faces, 32, 32)
    want = reference.interpolate_reference(attributes, faces, face_index, bary)
    got = pncc_cuda.interpolate(attributes.to(device), faces.to(device), face_index.to(device), bary.to(device))
    assert torch.equal(got.cpu(), want)

    ncc = attributes[0, :, :3].contiguous()
    pncc, mask = pncc_cuda.render_pncc(vertices.to(device), faces.to(device), ncc.to(device), 32, 32)
    want_pncc, want_mask = reference.render_pncc_reference(vertices, faces, ncc, 32, 32)
    assert torch.equal(pncc.cpu(), want_pncc) and torch.equal(mask.cpu(), want_mask)


@pytest.mark.parametrize("device", DEVICES)
def test_render_pncc_equals_interpolate_of_rasterize(device):
    mesh = face_mesh(20000, size=96, yaw=25.0)
    vertices = mesh.batch(2).to(device)
    faces, ncc = mesh.faces.to(device), mesh.ncc.to(device)
    pncc, mask = pncc_cuda.render_pncc(vertices, faces, ncc, 96, 96)
    face_index, bary, _ = pncc_cuda.rasterize(vertices, faces, 96, 96)
    unfused = pncc_cuda.interpolate(ncc.unsqueeze(0), faces, face_index, bary).permute(0, 3, 1, 2)
    assert torch.equal(pncc, unfused)
    assert torch.equal(mask[:, 0] > 0, face_index >= 0)
    # Per-image ncc (B, V, 3) gives per-image colours.
    pncc_b, _ = pncc_cuda.render_pncc(vertices, faces, torch.stack([ncc, 1 - ncc]), 96, 96)
    assert torch.equal(pncc_b[0], pncc[0])
    torch.testing.assert_close(pncc_b[1], mask[1] * (1 - pncc[1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name, mean_key, faces_key",
    [
        ("bfm_mean_3ddfa.npz", "mean_38365", "faces_76073"),
        ("bfm_mean_3ddfa.npz", "mean_53215", "faces_105840"),
        ("sfm_3448.npz", "mean", "faces"),
    ],
)
def test_real_face_meshes_match_reference(device, name, mean_key, faces_key):
    from pncc_cuda.testing import normalized_coordinate_code, rotation_y, to_image_space

    data = load_face_model(name)
    points = torch.from_numpy(data[mean_key]).float()
    faces = torch.from_numpy(data[faces_key]).int()
    ncc = normalized_coordinate_code(points)
    centred = points - points.mean(0)
    vertices = torch.stack(
        [to_image_space(centred @ rotation_y(yaw).T, 128) for yaw in (0.0, 40.0)]
    )
    want = reference.rasterize_reference(vertices, faces, 128, 128)
    got = pncc_cuda.rasterize(vertices.to(device), faces.to(device), 128, 128)
    assert_raster_equal(got, want)
    assert (want[0] >= 0).float().mean() > 0.25
    pncc, _ = pncc_cuda.render_pncc(vertices.to(device), faces.to(device), ncc.to(device), 128, 128)
    want_pncc, _ = reference.render_pncc_reference(vertices, faces, ncc, 128, 128)
    assert torch.equal(pncc.cpu(), want_pncc)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def lattice_safe_triangles(dtype=torch.float64):
    """Small triangles whose edges stay at least 0.05 px away from every pixel centre, so that a
    finite-difference step cannot change coverage (gradcheck needs a smooth neighbourhood)."""
    g = torch.Generator().manual_seed(3)
    kept = []
    while len(kept) < 4:
        tri = torch.rand(3, 2, generator=g, dtype=torch.float64) * 7 + 0.5
        a, b = tri, tri.roll(-1, 0)
        grid = torch.stack(torch.meshgrid(torch.arange(9.0), torch.arange(9.0), indexing="xy"), -1).reshape(-1, 1, 2).double()
        d = b - a
        cross = d[:, 0] * (grid[..., 1] - a[:, 1]) - d[:, 1] * (grid[..., 0] - a[:, 0])
        distance = cross.abs() / d.norm(dim=-1)
        area = torch.linalg.det(torch.cat([tri, torch.ones(3, 1, dtype=torch.float64)], 1)).abs()
        if distance.min() > 0.05 and area > 6:
            kept.append(torch.cat([tri, torch.rand(3, 1, generator=g, dtype=torch.float64)], 1))
    vertices = torch.cat(kept).unsqueeze(0).to(dtype)
    faces = torch.arange(12, dtype=torch.int32).reshape(4, 3)
    return vertices, faces


def test_gradcheck_float64():
    vertices, faces = lattice_safe_triangles()
    vertices.requires_grad_(True)
    attributes = torch.rand(1, 12, 2, dtype=torch.float64, requires_grad=True)

    def raster_fn(v):
        _, bary, depth = pncc_cuda.rasterize(v, faces, 9, 9)
        return bary, depth

    assert torch.autograd.gradcheck(raster_fn, (vertices,), eps=1e-6, atol=1e-6)
    face_index, bary, _ = pncc_cuda.rasterize(vertices.detach(), faces, 9, 9)
    bary.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: pncc_cuda.interpolate(a, faces, face_index, b), (attributes, bary)
    )
    ncc = torch.rand(12, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, c: pncc_cuda.render_pncc(v, faces, c, 9, 9)[0], (vertices, ncc), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_reference_autograd(device):
    vertices, faces = soup(num_faces=40, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    ncc = torch.rand(vertices.shape[1], 3, dtype=torch.float64, generator=g)
    grad_bary = torch.randn(2, 24, 24, 3, dtype=torch.float64, generator=g)
    grad_depth = torch.randn(2, 24, 24, dtype=torch.float64, generator=g)
    grad_pncc = torch.randn(2, 3, 24, 24, dtype=torch.float64, generator=g)

    def grads(fn, v, c):
        v = v.clone().requires_grad_(True)
        c = c.clone().requires_grad_(True)
        _, bary, depth = fn[0](v, faces.to(v.device), 24, 24)
        pncc, _ = fn[1](v, faces.to(v.device), c, 24, 24)
        loss = (bary * grad_bary.to(v.device)).sum() + (depth * grad_depth.to(v.device)).sum()
        loss = loss + (pncc * grad_pncc.to(v.device)).sum()
        return torch.autograd.grad(loss, (v, c))

    want = grads((reference.rasterize_reference, reference.render_pncc_reference), vertices, ncc)
    got = grads((pncc_cuda.rasterize, pncc_cuda.render_pncc), vertices.to(device), ncc.to(device))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9)
    assert want[0].abs().sum() > 0 and want[1].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_interpolate_gradients_with_shared_and_batched_attributes(device):
    vertices, faces = soup(num_faces=30, dtype=torch.float64)
    face_index, bary, _ = reference.rasterize_reference(vertices, faces, 24, 24)
    g = torch.Generator().manual_seed(2)
    for attr_batch in (1, 2):
        attributes = torch.rand(attr_batch, vertices.shape[1], 4, dtype=torch.float64, generator=g)
        upstream = torch.randn(2, 24, 24, 4, dtype=torch.float64, generator=g)

        def grads(fn, a, b, dev):
            a = a.to(dev).requires_grad_(True)
            b = b.to(dev).requires_grad_(True)
            out = fn(a, faces.to(dev), face_index.to(dev), b)
            return torch.autograd.grad((out * upstream.to(dev)).sum(), (a, b))

        want = grads(reference.interpolate_reference, attributes, bary, "cpu")
        got = grads(pncc_cuda.interpolate, attributes, bary, device)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12)


def test_double_backward_is_refused():
    vertices, faces = lattice_safe_triangles()
    vertices.requires_grad_(True)
    _, bary, _ = pncc_cuda.rasterize(vertices, faces, 9, 9)
    (grad,) = torch.autograd.grad(bary.pow(2).sum(), vertices, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def test_degenerate_triangles_cover_nothing_and_have_finite_gradients():
    vertices = torch.tensor(
        [[[1.0, 1.0, 0.0], [6.0, 6.0, 0.0], [3.0, 3.0, 1.0],  # collinear
          [2.0, 5.0, 0.0], [2.0, 5.0, 0.0], [2.0, 5.0, 0.0],  # a point
          [0.5, 0.5, 2.0], [7.5, 0.5, 2.0], [0.5, 7.5, 2.0]]],  # a real triangle
        dtype=torch.float64, requires_grad=True,
    )
    faces = torch.arange(9, dtype=torch.int32).reshape(3, 3)
    face_index, bary, depth = pncc_cuda.rasterize(vertices, faces, 8, 8)
    assert set(face_index.unique().tolist()) <= {-1, 2}
    (bary.sum() + depth.sum()).backward()
    assert torch.isfinite(vertices.grad).all()
    assert (vertices.grad[0, :6] == 0).all()


# ---------------------------------------------------------------------------------------------
# Fill rule, ties
# ---------------------------------------------------------------------------------------------


def shared_edge_placements(count, size, seed):
    """`count` pairs of triangles (A, B, C) and (B, A, D) sharing edge AB, C and D on opposite
    sides. Half are continuous random placements; half sit on a 1/2-pixel grid, so that many
    pixel centres lie exactly on edges (horizontal and vertical ones included)."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(count, 4, 2, generator=g, dtype=torch.float64) * (size - 1)
    half = count // 2
    pts[:half] = torch.round(pts[:half] * 2) / 2
    a, b, c, d = pts.unbind(1)

    def side(p):
        """cross(B - A, p - A) for points p of shape (count, ..., 2)."""
        e = b - a
        extra = (1,) * (p.dim() - 2)
        ex, ey = e[:, 0].view(-1, *extra), e[:, 1].view(-1, *extra)
        ax, ay = a[:, 0].view(-1, *extra), a[:, 1].view(-1, *extra)
        return ex * (p[..., 1] - ay) - ey * (p[..., 0] - ax)

    # Reflect D through AB's midpoint when it lies on C's side.
    d = torch.where((side(c) * side(d) > 0).unsqueeze(-1), a + b - d, d)
    return a, b, c, d, side


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("winding", ["ccw", "cw"])
def test_shared_edges_have_no_holes_and_no_double_coverage(device, winding):
    count, size = 10_000, 8
    a, b, c, d, side = shared_edge_placements(count, size, seed=11 if winding == "ccw" else 12)
    z = torch.zeros(count, 1, dtype=torch.float64)
    vertices = torch.stack([torch.cat([p, z], 1) for p in (a, b, c, d)], 1).float()
    tri0, tri1 = [0, 1, 2], [1, 0, 3]
    if winding == "cw":
        tri0, tri1 = tri0[::-1], tri1[::-1]
    vertices = vertices.to(device)
    cover = []
    for tri in (tri0, tri1):
        face_index, _, _ = pncc_cuda.rasterize(vertices, torch.tensor([tri], dtype=torch.int32, device=device), size, size)
        cover.append((face_index >= 0).cpu())
    both = pncc_cuda.rasterize(vertices, torch.tensor([tri0, tri1], dtype=torch.int32, device=device), size, size)[0].cpu()
    count_map = cover[0].int() + cover[1].int()
    assert count_map.max() <= 1, "a pixel was covered by both triangles"
    assert torch.equal(both >= 0, count_map == 1)

    # Every pixel centre inside the union, away from its outer boundary, is covered.
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    p = torch.stack([xs, ys], -1).reshape(1, -1, 2)

    def strictly_inside_outer_edges(apex, margin=1e-3):
        # p on apex's side of AB (or on AB), and more than `margin` inside the two other edges.
        def signed_distance(u, v, q, ref):
            e = (v - u).unsqueeze(1)
            s = e[..., 0] * (q[..., 1] - u[:, None, 1]) - e[..., 1] * (q[..., 0] - u[:, None, 0])
            r = (v[:, 0] - u[:, 0]) * (ref[:, 1] - u[:, 1]) - (v[:, 1] - u[:, 1]) * (ref[:, 0] - u[:, 0])
            return s * torch.sign(r).unsqueeze(1) / e.norm(dim=-1)

        return (
            (signed_distance(a, b, p, apex) >= 0)
            & (signed_distance(b, apex, p, a) > margin)
            & (signed_distance(apex, a, p, b) > margin)
        )

    interior = (strictly_inside_outer_edges(c) | strictly_inside_outer_edges(d)).reshape(count, size, size)
    # Where C or D lies on line AB, that triangle is degenerate and covers nothing, so AB is an
    # outer edge of the union, not a shared one: leave those placements to the coverage checks.
    proper = (side(c).abs() > 1e-9) & (side(d).abs() > 1e-9)
    assert proper.sum() > 0.9 * count
    interior &= proper.view(-1, 1, 1)
    holes = interior & (count_map == 0)
    assert not holes.any(), f"{int(holes.sum())} interior pixels were not covered"
    on_shared_edge = (side(p.expand(count, -1, -1)) == 0).reshape(count, size, size) & interior
    assert on_shared_edge.sum() > 100, "the grid placements must put pixel centres on shared edges"


@pytest.mark.parametrize("device", DEVICES)
def test_exact_depth_ties_go_to_the_lower_face_index(device):
    # Two identical triangles, and a third coplanar one overlapping them. At z = 0 every
    # interpolated depth is exactly 0 (the test also mixes -0.0 in), so all overlaps are ties.
    tri = [[1.0, 1.0, 0.0], [14.0, 2.0, -0.0], [4.0, 13.0, 0.0]]
    other = [[0.0, 8.0, -0.0], [15.0, 6.0, 0.0], [10.0, 15.0, 0.0]]
    vertices = torch.tensor([tri + tri + other], device=device)
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        faces = torch.tensor([[3 * k, 3 * k + 1, 3 * k + 2] for k in order], dtype=torch.int32, device=device)
        face_index, _, _ = pncc_cuda.rasterize(vertices, faces, 16, 16)
        single = [pncc_cuda.rasterize(vertices, faces[i : i + 1], 16, 16)[0] >= 0 for i in range(3)]
        for pixel_mask in [single[0] & single[1], single[0] & single[2], single[1] & single[2]]:
            covering = torch.stack(single).int().argmax(0)  # lowest listed face covering it
            assert torch.equal(face_index[pixel_mask], covering[pixel_mask].int())
        assert (torch.stack(single).int().sum(0) >= 2).sum() > 40, "the faces must overlap"


@pytest.mark.parametrize("device", DEVICES)
def test_nearest_triangle_wins_whatever_the_order(device):
    near = [[2.0, 2.0, 5.0], [13.0, 2.0, 5.0], [2.0, 13.0, 5.0]]
    far = [[1.0, 1.0, -1.0], [14.0, 1.0, -1.0], [1.0, 14.0, -1.0]]
    for pair, near_index in (([near, far], 0), ([far, near], 1)):
        vertices = torch.tensor([pair[0] + pair[1]], device=device)
        faces = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=device)
        face_index, _, depth = pncc_cuda.rasterize(vertices, faces, 16, 16)
        assert face_index[0, 5, 5] == near_index and depth[0, 5, 5] == 5.0
        assert face_index[0, 1, 1] == 1 - near_index and depth[0, 1, 1] == -1.0


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, no crashes (RELIABILITY 1, 2, 4)
# ---------------------------------------------------------------------------------------------


# Index values are range-checked on the CPU only: on CUDA the check would cost a reduction and a
# host sync per call, so the kernels guard instead (csrc/raster/raster_kernels.cuh).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [-1, 6, 6 + 10**6, 2**31 + 5])
def test_out_of_range_face_indices(device, bad):
    vertices = torch.rand(1, 6, 3, device=device) * 8
    faces = torch.tensor([[0, 1, 2], [3, 4, bad]], dtype=torch.int64, device=device)
    ncc = torch.rand(6, 3, device=device)
    attributes = torch.rand(1, 6, 2, device=device)
    face_index = torch.zeros(1, 8, 8, dtype=torch.int32, device=device)
    bary = torch.rand(1, 8, 8, 3, device=device)
    if device == "cpu":
        with pytest.raises(ValueError, match=r"faces must index vertices in \[0, 6\), got values in"):
            pncc_cuda.rasterize(vertices, faces, 8, 8)
        with pytest.raises(ValueError, match="faces must index vertices"):
            pncc_cuda.render_pncc(vertices, faces, ncc, 8, 8)
        with pytest.raises(ValueError, match="faces must index vertices"):
            pncc_cuda.interpolate(attributes, faces, face_index, bary)
        return
    # CUDA: the face with the bad index covers nothing and is never read.
    valid = faces[:1]
    for got, want in zip(pncc_cuda.rasterize(vertices, faces, 8, 8), pncc_cuda.rasterize(vertices, valid, 8, 8)):
        assert torch.equal(got, want)
    for got, want in zip(pncc_cuda.render_pncc(vertices, faces, ncc, 8, 8),
                         pncc_cuda.render_pncc(vertices, valid, ncc, 8, 8)):
        assert torch.equal(got, want)
    assert torch.equal(pncc_cuda.interpolate(attributes, faces, face_index, bary),
                       pncc_cuda.interpolate(attributes, valid, face_index, bary))


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_face_index_of_interpolate(device):
    faces = torch.tensor([[0, 1, 2]], dtype=torch.int32, device=device)
    attributes = torch.rand(1, 3, 2, device=device)
    bary = torch.rand(1, 4, 4, 3, device=device)
    for bad in (-2, 1, 2**30):
        face_index = torch.zeros(1, 4, 4, dtype=torch.int32, device=device)
        face_index[0, 1, 2] = bad
        if device == "cpu":
            with pytest.raises(ValueError, match=r"face_index must be -1 or index faces in \[0, 1\)"):
                pncc_cuda.interpolate(attributes, faces, face_index, bary)
            continue
        # CUDA: an out-of-range entry reads as background.
        background = face_index.clone()
        background[0, 1, 2] = -1
        assert torch.equal(pncc_cuda.interpolate(attributes, faces, face_index, bary),
                           pncc_cuda.interpolate(attributes, faces, background, bary))


@pytest.mark.parametrize(
    "call, exc, message",
    [
        (lambda: pncc_cuda.rasterize(torch.zeros(1, 3, 3, dtype=torch.int32), torch.zeros(1, 3, dtype=torch.int32), 4, 4),
         TypeError, "vertices must be a float32 or float64 tensor, got torch.int32"),
        (lambda: pncc_cuda.rasterize(torch.zeros(1, 3, 2), torch.zeros(1, 3, dtype=torch.int32), 4, 4),
         ValueError, r"vertices must have shape \(B, V, 3\), got \(1, 3, 2\)"),
        (lambda: pncc_cuda.rasterize(torch.zeros(3, 3), torch.zeros(1, 3, dtype=torch.int32), 4, 4),
         ValueError, r"vertices must have shape \(B, V, 3\), got \(3, 3\)"),
        (lambda: pncc_cuda.rasterize(torch.zeros(1, 3, 3), torch.zeros(1, 3), 4, 4),
         TypeError, "faces must be an int32 or int64 tensor, got torch.float32"),
        (lambda: pncc_cuda.rasterize(torch.zeros(1, 3, 3), torch.zeros(12, 4, dtype=torch.int32), 4, 4),
         ValueError, r"faces must have shape \(F, 3\), got \(12, 4\)"),
        (lambda: pncc_cuda.rasterize(torch.zeros(1, 3, 3), torch.zeros(1, 3, dtype=torch.int32), -1, 4),
         ValueError, r"height must be in \[0, 32768\], got -1"),
        (lambda: pncc_cuda.rasterize(torch.zeros(1, 3, 3), torch.zeros(1, 3, dtype=torch.int32), 4, 10**6),
         ValueError, r"width must be in \[0, 32768\], got 1000000"),
        (lambda: pncc_cuda.rasterize(torch.zeros(1, 3, 3), torch.zeros(1, 3, dtype=torch.int32), 4.0, 4),
         TypeError, "height must be an int, got float"),
        (lambda: pncc_cuda.render_pncc(torch.zeros(1, 3, 3), torch.zeros(1, 3, dtype=torch.int32), torch.zeros(3, 3, dtype=torch.float64), 4, 4),
         TypeError, "ncc must have dtype torch.float32 like vertices, got torch.float64"),
        (lambda: pncc_cuda.render_pncc(torch.zeros(2, 3, 3), torch.zeros(1, 3, dtype=torch.int32), torch.zeros(3, 3, 3), 4, 4),
         ValueError, r"ncc must have shape \(V, 3\) or \(B, V, 3\) with B=2 and V=3, got \(3, 3, 3\)"),
        (lambda: pncc_cuda.interpolate(torch.zeros(3, 2), torch.zeros(1, 3, dtype=torch.int32), torch.zeros(1, 2, 2, dtype=torch.int32), torch.zeros(1, 2, 2, 3)),
         ValueError, r"attributes must have shape \(B, V, C\) or \(1, V, C\), got \(3, 2\)"),
        (lambda: pncc_cuda.interpolate(torch.zeros(1, 3, 2), torch.zeros(1, 3, dtype=torch.int32), torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, 3)),
         TypeError, "face_index must be an int32 tensor, got torch.float32"),
        (lambda: pncc_cuda.interpolate(torch.zeros(1, 3, 2), torch.zeros(1, 3, dtype=torch.int32), torch.zeros(1, 2, 2, dtype=torch.int32), torch.zeros(1, 2, 3, 3)),
         ValueError, r"bary must have shape \(B, H, W, 3\) matching face_index \(1, 2, 2\), got \(1, 2, 3, 3\)"),
        (lambda: pncc_cuda.interpolate(torch.zeros(3, 3, 2), torch.zeros(1, 3, dtype=torch.int32), torch.zeros(2, 2, 2, dtype=torch.int32), torch.zeros(2, 2, 2, 3)),
         ValueError, r"attributes must have batch size 1 or B=2 like face_index, got \(3, 3, 2\)"),
    ],
)
def test_bad_input_raises_a_message_naming_the_argument(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_fake_kernels_raise_the_same_messages_as_the_kernels():
    cases = [
        ("rasterize", lambda d: (torch.zeros(1, 3, 2, device=d), torch.zeros(1, 3, dtype=torch.int32, device=d), 4, 4)),
        ("rasterize", lambda d: (torch.zeros(1, 3, 3, device=d), torch.zeros(12, 4, dtype=torch.int32, device=d), 4, 4)),
        ("rasterize", lambda d: (torch.zeros(1, 3, 3, device=d), torch.zeros(1, 3, device=d), 4, 4)),
        ("render_pncc", lambda d: (torch.zeros(2, 3, 3, device=d), torch.zeros(1, 3, dtype=torch.int32, device=d), torch.zeros(3, 3, 3, device=d), 4, 4)),
        ("interpolate", lambda d: (torch.zeros(3, 3, 2, device=d), torch.zeros(1, 3, dtype=torch.int32, device=d), torch.zeros(2, 2, 2, dtype=torch.int32, device=d), torch.zeros(2, 2, 2, 3, device=d))),
        ("_interpolate_backward", lambda d: (torch.zeros(1, 2, 2, 5, device=d), torch.zeros(1, 3, 2, device=d), torch.zeros(1, 3, dtype=torch.int32, device=d), torch.zeros(1, 2, 2, dtype=torch.int32, device=d), torch.zeros(1, 2, 2, 3, device=d))),
        ("_rasterize_backward", lambda d: (torch.zeros(1, 2, 2, 3, device=d), torch.zeros(1, 2, 3, device=d), torch.zeros(1, 3, 3, device=d), torch.zeros(1, 3, dtype=torch.int32, device=d), torch.zeros(1, 2, 2, dtype=torch.int32, device=d), torch.zeros(1, 2, 2, 3, device=d))),
    ]
    for name, make in cases:
        op = getattr(torch.ops.pncc, name).default
        messages = []
        for device in ("cpu", "meta"):
            with pytest.raises((ValueError, TypeError)) as info:
                op(*make(device))
            messages.append(str(info.value).splitlines()[0])
        assert messages[0] == messages[1], name


def test_mixed_devices_raise():
    with pytest.raises(ValueError, match=r"faces must be on the device of vertices \(cpu\), got meta"):
        torch.ops.pncc.rasterize.default(torch.zeros(1, 3, 3), torch.zeros(1, 3, dtype=torch.int32, device="meta"), 4, 4)


@pytest.mark.cuda
def test_mixed_cpu_and_cuda_raise():
    with pytest.raises(ValueError, match="faces must be on the device of vertices"):
        pncc_cuda.rasterize(torch.zeros(1, 3, 3, device="cuda"), torch.zeros(1, 3, dtype=torch.int32), 4, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_vertices_cover_nothing(device, bad):
    vertices, faces = soup(num_faces=20, batch=1)
    clean = reference.rasterize_reference(vertices, faces, 32, 32)
    for coordinate in range(3):
        poisoned = vertices.clone()
        poisoned[0, 3 * 5 + 1, coordinate] = bad  # one corner of face 5
        face_index, bary, depth = pncc_cuda.rasterize(poisoned.to(device), faces.to(device), 32, 32)
        assert not (face_index == 5).any()
        assert torch.isfinite(bary).all() and torch.isfinite(depth).all()
        assert torch.equal(face_index.cpu(), reference.rasterize_reference(poisoned, faces, 32, 32)[0])
    assert (clean[0] == 5).any(), "face 5 must be visible in the clean image for this test to mean anything"


@pytest.mark.parametrize("device", DEVICES)
def test_huge_coordinates_are_clamped_and_take_bounded_time(device):
    # A 1e10-sized bounding box must be clipped to the image, never iterated or cast.
    vertices = torch.tensor([[[-1e10, -1e10, 1.0], [1e10, -1e10, 1.0], [0.0, 1e10, 1.0],
                              [1e10, 1e10, 2.0], [3e10, 1e10, 2.0], [2e10, 3e10, 2.0]]], device=device)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=device)
    start = time.perf_counter()
    face_index, bary, depth = pncc_cuda.rasterize(vertices, faces, 256, 256)
    assert time.perf_counter() - start < 5.0
    assert (face_index == 0).all(), "the huge triangle contains the whole image"
    assert torch.isfinite(bary).all() and torch.isfinite(depth).all()
    assert_raster_equal((face_index, bary, depth), reference.rasterize_reference(vertices.cpu(), faces.cpu(), 256, 256))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, num_vertices, num_faces, height, width", [
    (0, 5, 2, 8, 8), (2, 5, 0, 8, 8), (2, 0, 0, 8, 8), (2, 5, 2, 0, 8), (2, 5, 2, 8, 0),
])
def test_empty_inputs_give_correctly_shaped_outputs(device, batch, num_vertices, num_faces, height, width):
    vertices = torch.rand(batch, num_vertices, 3, device=device, requires_grad=True)
    faces = torch.zeros(num_faces, 3, dtype=torch.int32, device=device)
    face_index, bary, depth = pncc_cuda.rasterize(vertices, faces, height, width)
    assert face_index.shape == (batch, height, width) and bary.shape == (batch, height, width, 3)
    assert (face_index == -1).all() and (bary == 0).all() and (depth == 0).all()
    (bary.sum() + depth.sum()).backward()
    assert vertices.grad.shape == vertices.shape
    pncc, mask = pncc_cuda.render_pncc(vertices, faces, torch.rand(num_vertices, 3, device=device), height, width)
    assert pncc.shape == (batch, 3, height, width) and mask.shape == (batch, 1, height, width)
    assert (pncc == 0).all() and (mask == 0).all()
    out = pncc_cuda.interpolate(torch.rand(1, num_vertices, 2, device=device), faces, face_index, bary.detach())
    assert out.shape == (batch, height, width, 2) and (out == 0).all()


@pytest.mark.cuda
def test_cuda_outputs_beyond_int32_element_counts():
    # B*H*W*C > 2^31: the kernels index with int64.
    face_index = torch.zeros(1, 8192, 8192, dtype=torch.int32, device="cuda")
    bary = torch.full((1, 8192, 8192, 3), 1 / 3, device="cuda")
    attributes = torch.arange(3 * 33, dtype=torch.float32, device="cuda").reshape(1, 3, 33)
    out = pncc_cuda.interpolate(attributes, torch.tensor([[0, 1, 2]], device="cuda"), face_index, bary)
    assert out.numel() > 2**31
    torch.testing.assert_close(out[0, -1, -1], attributes[0].mean(0))


# ---------------------------------------------------------------------------------------------
# Layouts, threads, determinism (RELIABILITY 6-8)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_match_contiguous(device):
    vertices, faces = soup(num_faces=50)
    vertices, faces = vertices.to(device), faces.to(device)
    want = pncc_cuda.rasterize(vertices, faces, 32, 32)
    permuted = vertices.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not permuted.is_contiguous()
    assert_raster_equal(pncc_cuda.rasterize(permuted, faces, 32, 32), want)
    wide_faces = torch.stack([faces, faces], 1).reshape(-1, 3)[::2]
    assert not wide_faces.is_contiguous()
    assert_raster_equal(pncc_cuda.rasterize(vertices, wide_faces, 32, 32), want)
    expanded = vertices[:1].expand(3, -1, -1)
    single = pncc_cuda.rasterize(vertices[:1], faces, 32, 32)
    for got, one in zip(pncc_cuda.rasterize(expanded, faces, 32, 32), single):
        assert torch.equal(got, one.expand_as(got))
    ncc = torch.rand(3, vertices.shape[1], device=device).T
    assert torch.equal(
        pncc_cuda.render_pncc(vertices, faces, ncc, 32, 32)[0],
        pncc_cuda.render_pncc(vertices, faces, ncc.contiguous(), 32, 32)[0],
    )


def test_int64_faces_match_int32():
    vertices, faces = soup()
    assert_raster_equal(pncc_cuda.rasterize(vertices, faces.long(), 32, 32), pncc_cuda.rasterize(vertices, faces, 32, 32))


def test_cpu_results_are_bitwise_identical_across_thread_counts(num_threads):
    mesh = face_mesh(20000, size=64, yaw=30.0)
    vertices = torch.cat([mesh.batch(1), mesh.batch(1) + 0.37])
    g = torch.Generator().manual_seed(5)
    grad_pncc = torch.randn(2, 3, 64, 64, generator=g)
    results = []
    for threads in (1, 2, 5):
        num_threads(threads)
        for batch in (vertices[:1], vertices):
            v = batch.clone().requires_grad_(True)
            ncc = mesh.ncc.clone().requires_grad_(True)
            raster = pncc_cuda.rasterize(v, mesh.faces, 64, 64)
            pncc, mask = pncc_cuda.render_pncc(v, mesh.faces, ncc, 64, 64)
            (pncc * grad_pncc[: len(batch)]).sum().backward()
            results.append((*raster, pncc, mask, v.grad, ncc.grad))
    for other in results[2:]:
        index = 0 if other[0].shape[0] == 1 else 1
        for a, b in zip(other, results[index]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_forwards_are_bitwise_equal(device):
    mesh = face_mesh(20000, size=128, yaw=-20.0)
    batch = 32 if device == "cuda" else 4
    vertices = (mesh.batch(batch) + torch.rand(batch, 1, 3)).to(device)
    faces, ncc = mesh.faces.to(device), mesh.ncc.to(device)
    first = pncc_cuda.render_pncc(vertices, faces, ncc, 128, 128)
    raster = pncc_cuda.rasterize(vertices, faces, 128, 128)
    for _ in range(100 if device == "cuda" else 5):
        again = pncc_cuda.render_pncc(vertices, faces, ncc, 128, 128)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert_raster_equal(pncc_cuda.rasterize(vertices, faces, 128, 128), raster)


@pytest.mark.cuda
def test_cuda_render_pncc_peak_memory_is_outputs_plus_zbuffer():
    mesh = face_mesh(76073, size=256)
    vertices = mesh.batch(64).cuda()
    faces, ncc = mesh.faces.cuda(), mesh.ncc.cuda()
    pncc_cuda.render_pncc(vertices, faces, ncc, 256, 256)  # warm-up: kernels loaded
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = pncc_cuda.render_pncc(vertices, faces, ncc, 256, 256)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    outputs = sum(t.numel() * t.element_size() for t in out)
    zbuffer = 64 * 256 * 256 * 8
    assert peak <= (outputs + zbuffer) * 1.01 + 4096


@pytest.mark.cuda
def test_cuda_backward_with_atomics_refuses_deterministic_mode():
    vertices, faces = soup()
    vertices = vertices.cuda().requires_grad_(True)
    _, bary, _ = pncc_cuda.rasterize(vertices, faces.cuda(), 32, 32)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="_rasterize_backward_cuda"):
            bary.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------------------------------------
# torch.library integration
# ---------------------------------------------------------------------------------------------


opcheck_all = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    vertices, faces = lattice_safe_triangles(torch.float32)
    vertices, faces = vertices.to(device).requires_grad_(True), faces.to(device)
    face_index, bary, depth = pncc_cuda.rasterize(vertices.detach(), faces, 9, 9)
    attributes = torch.rand(1, 12, 2, device=device, requires_grad=True)
    ncc = torch.rand(12, 3, device=device, requires_grad=True)
    ops = torch.ops.pncc
    cases = [
        (ops.rasterize.default, (vertices, faces, 9, 9)),
        (ops.interpolate.default, (attributes, faces, face_index, bary.clone().requires_grad_(True))),
        (ops.render_pncc.default, (vertices, faces, ncc, 9, 9)),
        (ops._rasterize_backward.default, (torch.rand_like(bary), torch.rand_like(depth), vertices.detach(), faces, face_index, bary)),
        (ops._interpolate_backward.default, (torch.rand(1, 9, 9, 2, device=device), attributes.detach(), faces, face_index, bary)),
    ]
    for op, args in cases:
        utils = None
        if op is ops.rasterize.default:
            # opcheck's aot_dispatch test sums all outputs into one accumulator, which fails when
            # the first output is an integer tensor (face_index); the compile test below covers
            # AOT dispatch of rasterize instead.
            utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        torch.library.opcheck(op, args, test_utils=utils or opcheck_all)


def test_torch_compile_fullgraph_through_render_pncc():
    vertices, faces = lattice_safe_triangles(torch.float32)
    ncc = torch.rand(12, 3)

    def loss_fn(v):
        pncc, mask = pncc_cuda.render_pncc(v, faces, ncc, 9, 9)
        return (pncc * mask).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    v_eager = vertices.clone().requires_grad_(True)
    v_compiled = vertices.clone().requires_grad_(True)
    loss_eager = loss_fn(v_eager)
    loss_eager.backward()
    loss_compiled = compiled(v_compiled)
    loss_compiled.backward()
    assert torch.equal(loss_eager, loss_compiled)
    torch.testing.assert_close(v_eager.grad, v_compiled.grad)


def test_torch_compile_dynamic_through_rasterize_and_interpolate():
    vertices, faces = lattice_safe_triangles(torch.float32)
    attributes = torch.rand(1, 12, 4)

    def fn(v):
        face_index, bary, depth = pncc_cuda.rasterize(v, faces, 9, 9)
        return pncc_cuda.interpolate(attributes, faces, face_index, bary).sum() + depth.sum()

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (1, 3):
        v_eager = vertices.expand(batch, -1, -1).clone().requires_grad_(True)
        v_compiled = v_eager.detach().clone().requires_grad_(True)
        fn(v_eager).backward()
        compiled(v_compiled).backward()
        torch.testing.assert_close(v_eager.grad, v_compiled.grad)
