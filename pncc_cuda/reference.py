"""Pure-PyTorch references of every pncc op.

Slow, obviously correct, float64-capable and differentiable through plain autograd. They are the
test oracle, the benchmark baseline and the executable definition of each op's semantics.
"""
import torch

# ---------------------------------------------------------------------------------------------
# Rasterizer: rasterize, interpolate, render_pncc
# ---------------------------------------------------------------------------------------------


def _edge_function(ax, ay, bx, by, px, py):
    """cross(b - a, p - a) with the endpoints taken in canonical (y, x) order and the sign
    restored afterwards, exactly as csrc/raster/raster_math.h evaluates it (that ordering is what
    makes shared edges watertight)."""
    swap = (by < ay) | ((by == ay) & (bx < ax))
    first_x, first_y = torch.where(swap, bx, ax), torch.where(swap, by, ay)
    dx = torch.where(swap, ax, bx) - first_x
    dy = torch.where(swap, ay, by) - first_y
    w = dx * (py - first_y) - dy * (px - first_x)
    return torch.where(swap, -w, w)


def _sample_span(lo, hi, last_allowed):
    """First and last integer sample in [lo, hi] clamped to [0, last_allowed]; NaN never passes."""
    valid = (hi >= 0) & (lo <= last_allowed)
    first = torch.ceil(lo.clamp(min=0, max=last_allowed).nan_to_num(0.0))
    last = torch.floor(hi.clamp(min=0, max=last_allowed).nan_to_num(0.0))
    return valid & (first <= last), first.long(), last.long()


def _barycentrics(x, y, z, px, py):
    """Weights and depth of samples (px, py) in triangles with corners (x, y, z)[..., i].

    Returns (w (..., 3) edge values, bary (..., 3), depth (...)); the operation order matches
    bary_from_edges and interpolate_depth in raster_math.h.
    """
    w = torch.stack(
        [
            _edge_function(x[..., 1], y[..., 1], x[..., 2], y[..., 2], px, py),
            _edge_function(x[..., 2], y[..., 2], x[..., 0], y[..., 0], px, py),
            _edge_function(x[..., 0], y[..., 0], x[..., 1], y[..., 1], px, py),
        ],
        dim=-1,
    )
    total = (w[..., 0] + w[..., 1]) + w[..., 2]
    bary = w * (1.0 / total).unsqueeze(-1)
    depth = (bary[..., 0] * z[..., 0] + bary[..., 1] * z[..., 1]) + bary[..., 2] * z[..., 2]
    return w, bary, depth


def rasterize_reference(vertices, faces, height, width):
    """Reference of `pncc_cuda.rasterize`; differentiable through autograd.

    Enumerates the pixel samples inside every triangle's bounding box (never every pixel for
    every triangle), applies the coverage rule of raster_math.h, and keeps per pixel the largest
    float32 depth, then the lowest face index.
    """
    batch, num_vertices = vertices.shape[0], vertices.shape[1]
    faces = faces.long()
    num_faces = faces.shape[0]
    device, dtype = vertices.device, vertices.dtype
    face_index = torch.full((batch, height, width), -1, dtype=torch.int32, device=device)
    bary = vertices.new_zeros((batch, height, width, 3))
    depth = vertices.new_zeros((batch, height, width))
    if batch * height * width == 0 or num_faces == 0:
        return face_index, bary, depth

    with torch.no_grad():
        corners = vertices.detach()[:, faces]  # (B, F, 3 corners, 3 coords)
        x, y, z = corners[..., 0], corners[..., 1], corners[..., 2]
        finite = torch.isfinite(corners).flatten(-2).all(-1)
        ok_x, col0, col1 = _sample_span(x.amin(-1), x.amax(-1), width - 1)
        ok_y, row0, row1 = _sample_span(y.amin(-1), y.amax(-1), height - 1)
        area = _edge_function(x[..., 1], y[..., 1], x[..., 2], y[..., 2], x[..., 0], y[..., 0])
        keep = finite & ok_x & ok_y & (area != 0) & torch.isfinite(area)
        b_idx, f_idx = keep.nonzero(as_tuple=True)
        if b_idx.numel() == 0:
            return face_index, bary, depth

        # One row per (triangle, sample in its clamped bounding box).
        cols = col1[b_idx, f_idx] - col0[b_idx, f_idx] + 1
        rows = row1[b_idx, f_idx] - row0[b_idx, f_idx] + 1
        counts = cols * rows
        tri = torch.repeat_interleave(torch.arange(b_idx.numel(), device=device), counts)
        start = torch.cumsum(counts, 0) - counts
        local = torch.arange(int(counts.sum()), device=device) - start[tri]
        px = (col0[b_idx, f_idx][tri] + local % cols[tri]).to(dtype)
        py = (row0[b_idx, f_idx][tri] + local // cols[tri]).to(dtype)
        cb, cf = b_idx[tri], f_idx[tri]
        cx, cy, cz = x[cb, cf], y[cb, cf], z[cb, cf]

        orient = torch.where(area[cb, cf] > 0, 1.0, -1.0).to(dtype)
        w, cand_bary, cand_depth = _barycentrics(cx, cy, cz, px, py)
        w = w * orient.unsqueeze(-1)
        # Top-left rule on the positively oriented traversal direction of each edge.
        ex = torch.stack([cx[:, 2] - cx[:, 1], cx[:, 0] - cx[:, 2], cx[:, 1] - cx[:, 0]], -1)
        ey = torch.stack([cy[:, 2] - cy[:, 1], cy[:, 0] - cy[:, 2], cy[:, 1] - cy[:, 0]], -1)
        ex, ey = ex * orient.unsqueeze(-1), ey * orient.unsqueeze(-1)
        owns = (ey < 0) | ((ey == 0) & (ex > 0))
        inside = ((w > 0) | ((w == 0) & owns)).all(-1)
        total = (w[:, 0] + w[:, 1]) + w[:, 2]
        inside &= (total != 0) & torch.isfinite(total) & torch.isfinite(cand_depth)

        pixel = (cb * height + py.long()) * width + px.long()
        pixel, cf, key_depth = pixel[inside], cf[inside], cand_depth[inside].float()
        # Nearest first, then the lowest face index: the order of the packed z-buffer key.
        best = torch.full((batch * height * width,), -torch.inf, device=device)
        best = best.scatter_reduce(0, pixel, key_depth, "amax")
        is_best = key_depth == best[pixel]
        winner = torch.full((batch * height * width,), num_faces, dtype=torch.long, device=device)
        winner = winner.scatter_reduce(0, pixel[is_best], cf[is_best], "amin")
        winner = torch.where(winner == num_faces, -1, winner)

    covered = (winner >= 0).nonzero(as_tuple=True)[0]
    face_index.view(-1)[covered] = winner[covered].int()
    # Resolve with autograd: barycentrics and depth as functions of the vertices.
    cb = covered // (height * width)
    py = ((covered // width) % height).to(dtype)
    px = (covered % width).to(dtype)
    corners = vertices[cb.unsqueeze(-1), faces[winner[covered]]]  # (N, 3, 3)
    _, pix_bary, pix_depth = _barycentrics(
        corners[..., 0], corners[..., 1], corners[..., 2], px, py
    )
    bary = bary.view(-1, 3).index_put((covered,), pix_bary).view(batch, height, width, 3)
    depth = depth.view(-1).index_put((covered,), pix_depth).view(batch, height, width)
    return face_index, bary, depth


def interpolate_reference(attributes, faces, face_index, bary):
    """Reference of `pncc_cuda.interpolate`: gather the three corner values and blend."""
    batch = face_index.shape[0]
    faces = faces.long()
    attributes = attributes.expand(batch, -1, -1)
    visible = face_index >= 0
    corner = faces[face_index.long().clamp(min=0)]  # (B, H, W, 3)
    batch_idx = torch.arange(batch, device=face_index.device).view(batch, 1, 1, 1)
    values = attributes[batch_idx, corner]  # (B, H, W, 3, C)
    out = (bary[..., 0:1] * values[..., 0, :] + bary[..., 1:2] * values[..., 1, :]) + bary[
        ..., 2:3
    ] * values[..., 2, :]
    return torch.where(visible.unsqueeze(-1), out, torch.zeros_like(out))


def render_pncc_reference(vertices, faces, ncc, height, width):
    """Reference of `pncc_cuda.render_pncc`: rasterize, interpolate, permute to channel-first."""
    face_index, bary, _ = rasterize_reference(vertices, faces, height, width)
    attributes = ncc if ncc.dim() == 3 else ncc.unsqueeze(0)
    pncc = interpolate_reference(attributes, faces, face_index, bary).permute(0, 3, 1, 2)
    mask = (face_index >= 0).unsqueeze(1).to(vertices.dtype)
    return pncc.contiguous(), mask


# ---------------------------------------------------------------------------------------------
# Correspondence: corr_warp
# ---------------------------------------------------------------------------------------------


def corr_warp_normalize(x, normalize=True, eps=1e-6):
    """Channel-mean centring and L2 normalisation of the rows of x (..., C), as corr_warp does."""
    if not normalize:
        return x
    c = x - x.mean(dim=-1, keepdim=True)
    return c / (torch.linalg.vector_norm(c, dim=-1, keepdim=True) + eps)


def corr_warp_reference(query, key, value, temperature, normalize=True, eps=1e-6):
    """Unfused corr_warp: normalise, matmul, softmax, matmul, in the dtype of the inputs.

    Args:
        query: (B, Nq, C); key: (B, Nk, C); value: (B, Nk, Cv); any floating dtype, float64 too.
        temperature: softmax temperature (> 0).
        normalize: centre and L2-normalise query/key rows over C; eps is added to the norms.

    Returns:
        (B, Nq, Cv): softmax(q^ k^T / temperature, dim=-1) @ value. Materialises (B, Nq, Nk).
    """
    q = corr_warp_normalize(query, normalize, eps)
    k = corr_warp_normalize(key, normalize, eps)
    scores = torch.matmul(q, k.transpose(-1, -2)) / temperature
    return torch.matmul(torch.softmax(scores, dim=-1), value)
