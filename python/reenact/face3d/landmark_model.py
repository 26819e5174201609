"""The model side of the landmark fit (:mod:`reenact.face3d.fit`): the model's landmark bases,
the (sliding) contour anchors, projected model points, the robust cost, and the residuals and
Jacobians that each Levenberg-Marquardt iteration solves with."""
import torch

from .morphable import NUM_LANDMARKS, as_tensor


class _LandmarkBases:
    """The model restricted to the vertices landmarks can use, in the fitting dtype and device."""

    def __init__(self, model, dtype, device, landmark_offsets=None):
        fixed = model.landmarks68.clone()
        candidates = [fixed[fixed >= 0]]
        self.sliding = []  # (landmark index, side number) pairs
        self.sides = []  # candidate positions into `used` of each contour polyline
        if model.has_contours:
            candidates += [model.contour_right, model.contour_left]
        used = torch.unique(torch.cat([c.to(model.device) for c in candidates]))
        position = torch.full((model.num_vertices,), -1, dtype=torch.int64, device=model.device)
        position[used] = torch.arange(used.numel(), device=model.device)
        self.used = used.to(device)
        self.mean = model.mean[used].to(device=device, dtype=dtype)
        self.id_basis = model.id_basis[used].to(device=device, dtype=dtype)
        self.exp_basis = model.exp_basis[used].to(device=device, dtype=dtype)
        # (3, U, K) copies for the Jacobians: one (B, 2, 3) x (3, U K) product per basis.
        self.id_basis_t = self.id_basis.permute(1, 0, 2).contiguous()
        self.exp_basis_t = self.exp_basis.permute(1, 0, 2).contiguous()
        # Landmarks without a fixed vertex and outside the contour get weight 0 (e.g. SFM's
        # inner mouth corners); their slot points at position 0.
        self.default_position = torch.where(fixed >= 0, position[fixed.clamp_min(0)], 0).to(device)
        self.defined = (fixed >= 0).to(device)
        # Per-landmark model-space offsets (L, 3), 0 for sliding and undefined landmarks.
        self.offsets = None
        if landmark_offsets is not None:
            offsets = as_tensor("landmark_offsets", landmark_offsets, dtype, "(68, 3)")
            if offsets.shape != (NUM_LANDMARKS, 3) or not torch.isfinite(offsets).all():
                raise ValueError(f"landmark_offsets must be finite with shape (68, 3), got {tuple(offsets.shape)}")
            self.offsets = torch.where((fixed >= 0)[:, None].to(offsets.device), offsets, 0).to(device)
        if model.has_contours:
            right = position[model.contour_right].to(device)
            left = position[model.contour_left].to(device)
            # The chin, when it slides, uses the whole outline: right side down, left side up.
            self.sides = [right, left, torch.cat([right, left.flip(0)])]
            for k in range(17):
                if fixed[k] < 0:
                    self.sliding.append((k, 0 if k < 8 else 1 if k > 8 else 2))
                    self.defined[k] = True
        # The sliding landmarks grouped by contour side: (side number, their slots, their landmarks).
        self.sliding_index = torch.tensor([k for k, _ in self.sliding], dtype=torch.int64, device=device)
        self.sliding_groups = [
            (side, torch.tensor([i for i, (_, s) in enumerate(self.sliding) if s == side], device=device),
             torch.tensor([k for k, s in self.sliding if s == side], device=device))
            for side in sorted({s for _, s in self.sliding})]


class _Anchors:
    """Where each landmark sits on the model: between two base vertices, ``(1-w)*first + w*second``.

    Fixed landmarks have ``first == second``; a sliding outline landmark lies on a segment of its
    contour polyline, so it slides continuously rather than jumping between candidate vertices.
    first, second: (B, L) int64 positions into the landmark bases; weight: (B, L).
    projection: None, or (B, S, 2, 2) for the S sliding landmarks ``sliding_index``: the
    projection onto the contour's image normal, applied to those landmarks' residuals. The
    residual along the contour is zero by construction (the point may slide there), and leaving
    it in would make the solver fight the sliding (ICP's point-to-point versus point-to-plane).
    """

    def __init__(self, first, second, weight, sliding_index=None, projection=None):
        self.first, self.second, self.weight = first, second, weight
        self.sliding_index, self.projection = sliding_index, projection

    def project(self, values):
        """Apply the sliding landmarks' normal projections to (B, L, 2, ...) values."""
        if self.projection is None:
            return values
        out = values.clone()
        out[:, self.sliding_index] = torch.einsum("bsij,bsj...->bsi...", self.projection,
                                                  values[:, self.sliding_index])
        return out

    def gather(self, table):
        """Interpolate rows of ``table`` (U, ...), the same for every frame -> (B, L, ...)."""
        return self.interpolate(table.expand(self.first.shape[0], *table.shape))

    def interpolate(self, values):
        """Interpolate each frame's rows of ``values`` (B, U, ...) -> (B, L, ...)."""
        frames = torch.arange(values.shape[0], device=values.device)[:, None]
        out = values[frames, self.first]
        if self.sliding_index is not None:  # only sliding landmarks sit between two vertices
            slots = self.sliding_index
            w = self.weight[:, slots].reshape(*self.weight.shape[:1], -1, *([1] * (values.ndim - 2)))
            out[:, slots] += w * (values[frames, self.second[:, slots]] - out[:, slots])
        return out

    def choose(self, take_other, other):
        """Per frame, ``other``'s anchors where ``take_other`` (B,) is set, else these."""
        def pick(mine, theirs):
            return torch.where(take_other.reshape(-1, *([1] * (mine.ndim - 1))), theirs, mine)
        mine = self.projection
        if mine is None:
            mine = torch.eye(2, dtype=other.projection.dtype, device=other.projection.device).expand_as(other.projection)
        return _Anchors(pick(self.first, other.first), pick(self.second, other.second),
                        pick(self.weight, other.weight), other.sliding_index, pick(mine, other.projection))

    def nearest(self):
        """(B, L) position of the nearer of the two vertices."""
        return torch.where(self.weight < 0.5, self.first, self.second)


def _vertex_points(bases, alpha, beta):
    """Model-space points (B, U, 3) of every vertex the landmarks can use, for alpha (B, Ki) and
    beta (B, Ke): one matrix product per basis, whatever the anchors (the landmarks are then
    interpolated from these rows, which is exact: projection is affine and anchor weights sum to 1)."""
    shape = bases.mean.expand(beta.shape[0], -1, -1)
    if alpha.shape[-1]:
        shape = shape + torch.einsum("uck,bk->buc", bases.id_basis, alpha)
    if beta.shape[-1]:
        shape = shape + torch.einsum("uck,bk->buc", bases.exp_basis, beta)
    return shape


def _rotated_landmarks(bases, anchors, rotated_vertices, rotation):
    """Rotated model points (B, L, 3) of the landmarks: interpolated from the rotated vertices
    (B, U, 3), plus the rotated landmark offsets."""
    rotated = anchors.interpolate(rotated_vertices)
    if bases.offsets is not None:
        rotated = rotated + bases.offsets @ rotation.transpose(-1, -2)
    return rotated


def _dot2(a, b):
    """Dot products of 2-vectors along the last axis (torch's reduction over a last axis of 2 is
    several times slower than the two products)."""
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1]


def _to_image(rotated, scale, translation):
    """Rotated model points (B, N, 3) -> (B, N, 2) pixels."""
    flipped = torch.stack([rotated[..., 0], -rotated[..., 1]], -1)
    return scale[:, None, None] * flipped + translation[:, None, :]


def _robust_cost(squared, huber):
    """rho of squared residual lengths (in sigmas^2): s, or Huber's 2k|r| - k^2 beyond k."""
    if huber is None:
        return squared
    length = squared.clamp_min(1e-30).sqrt()
    return torch.where(length <= huber, squared, 2 * huber * length - huber * huber)


def _huber_weight(squared, huber):
    """IRLS weight rho'(s) of Huber's loss: 1 inside the threshold, k/|r| beyond."""
    return (huber / squared.clamp_min(1e-30).sqrt()).clamp_max(1.0)


def _slide_contours(bases, anchors, landmarks, projected_vertices):
    """Move each sliding landmark to the nearest point of its projected contour polyline.

    projected_vertices: (B, U, 2) pixel positions of the bases' vertices at the current estimate.
    All landmarks sliding on one side of the outline are placed in one batched step."""
    if not bases.sliding:
        return anchors
    first, second, weight = anchors.first.clone(), anchors.second.clone(), anchors.weight.clone()
    batch = first.shape[0]
    projection = torch.empty(batch, len(bases.sliding), 2, 2, dtype=landmarks.dtype, device=landmarks.device)
    eye = torch.eye(2, dtype=landmarks.dtype, device=landmarks.device)
    for side_number, slots, ks in bases.sliding_groups:
        side = bases.sides[side_number]
        projected = projected_vertices[:, side]  # (B, C, 2)
        start, direction = projected[:, None, :-1], (projected[:, 1:] - projected[:, :-1])[:, None]
        offset = landmarks[:, ks, None, :] - start  # (B, S, C-1, 2)
        t = (_dot2(offset, direction) / _dot2(direction, direction).clamp_min(1e-12)).clamp(0, 1)
        gap = offset - t[..., None] * direction
        distance = _dot2(gap, gap)
        segment = distance.argmin(-1)  # (B, S)
        first[:, ks] = side[segment]
        second[:, ks] = side[segment + 1]
        weight[:, ks] = t.gather(2, segment[..., None]).squeeze(2)
        tangent = direction[:, 0].gather(1, segment[..., None].expand(-1, -1, 2))  # (B, S, 2)
        tangent = tangent / tangent.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        projection[:, slots] = eye - tangent[..., :, None] * tangent[..., None, :]
    return _Anchors(first, second, weight, bases.sliding_index, projection)


def _affine_initial_pose(bases, anchors, landmarks, weights):
    """Per-frame least-squares affine camera from the mean shape, made a scaled rotation.

    Returns rotation (B, 3, 3), scale (B,), translation (B, 2).
    """
    points = anchors.gather(bases.mean)  # (B, L, 3)
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], -1)  # (B, L, 4)
    weighted = homogeneous * weights[..., None]
    normal = weighted.transpose(1, 2) @ homogeneous
    normal = normal + 1e-9 * torch.eye(4, dtype=normal.dtype, device=normal.device) * normal.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None]
    solution = torch.linalg.solve(normal, weighted.transpose(1, 2) @ landmarks)  # (B, 4, 2)
    affine = solution[:, :3, :].transpose(1, 2)  # rows: image x, image y
    rows = torch.stack([affine[:, 0], -affine[:, 1]], 1)  # undo the y flip: rows of s*R
    u, sigma, vh = torch.linalg.svd(rows, full_matrices=False)
    scale = sigma.mean(-1)
    first_two = u @ vh
    third = torch.linalg.cross(first_two[:, 0], first_two[:, 1], dim=-1)
    rotation = torch.cat([first_two, third[:, None]], 1)
    degenerate = ~torch.isfinite(rotation).all(dim=(1, 2)) | (scale <= 0)
    rotation = torch.where(degenerate[:, None, None], torch.eye(3, dtype=rotation.dtype, device=rotation.device), rotation)
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    return rotation, scale, solution[:, 3, :]


def residuals_and_jacobians(bases, anchors, landmarks, row_weight, alpha, beta, rotation,
                            log_scale, translation):
    """Weighted residuals and their Jacobians at the current estimate.

    Args: anchors (:class:`_Anchors`) into ``bases``; landmarks (B, L, 2); row_weight (B, L); alpha (B, Ki)
    (each frame's identity); beta (B, Ke); rotation (B, 3, 3); log_scale (B,); translation (B, 2).
    Returns:
        res (B, 2L): row-weighted projected - observed, landmark-major (x, y interleaved);
        jac_frame (B, 2L, 6 + Ke): d res / d (rotation increment (3), log scale, tx, ty, beta),
            the rotation increment being the axis-angle ``d`` in ``R <- exp([d]x) R``;
        jac_id (B, 2L, Ki): d res / d alpha.
    """
    scale = log_scale.exp()
    rotated = _rotated_landmarks(bases, anchors, _vertex_points(bases, alpha, beta) @ rotation.transpose(-1, -2),
                                 rotation)
    residual = anchors.project(_to_image(rotated, scale, translation) - landmarks)
    return _weighted_jacobians(bases, anchors, rotated, residual, row_weight, rotation, scale)


def _weighted_jacobians(bases, anchors, rotated, residual, row_weight, rotation, scale):
    """:func:`residuals_and_jacobians` from the rotated landmark points (B, L, 3) and the
    (normal-projected) residuals (B, L, 2) already computed at the estimate."""
    dtype, device = rotated.dtype, rotated.device
    batch, num_landmarks = anchors.first.shape
    # d(R X)/dd = -[R X]x; image x is +s*(R X)_x, image y is -s*(R X)_y.
    wx, wy, wz = rotated.unbind(-1)
    zero = torch.zeros_like(wx)
    s4 = scale[:, None, None, None]
    jac_rot = s4 * torch.stack([torch.stack([zero, wz, -wy], -1), torch.stack([wz, zero, -wx], -1)], -2)
    jac_scale = s4 * torch.stack([wx, -wy], -1)[..., None]
    jac_trans = torch.eye(2, dtype=dtype, device=device).expand(batch, num_landmarks, 2, 2)
    projection_rows = scale[:, None, None] * torch.stack([rotation[:, 0], -rotation[:, 1]], 1)  # (B, 2, 3)

    def basis_jacobian(basis):  # (3, U, K) -> (B, L, 2, K): per vertex, then interpolated
        if not basis.shape[-1]:
            return basis.new_zeros(batch, num_landmarks, 2, 0)
        per_vertex = (projection_rows @ basis.flatten(1)).unflatten(-1, basis.shape[1:])  # (B, 2, U, K)
        return anchors.interpolate(per_vertex.transpose(1, 2))

    jac_frame = anchors.project(torch.cat([jac_rot, jac_scale, jac_trans, basis_jacobian(bases.exp_basis_t)], -1))
    jac_id = anchors.project(basis_jacobian(bases.id_basis_t))
    weight = row_weight[..., None, None]
    return ((residual * row_weight[..., None]).flatten(1), (jac_frame * weight).flatten(1, 2),
            (jac_id * weight).flatten(1, 2))
