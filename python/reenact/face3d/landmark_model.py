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
        self._gathered = {}  # anchors never change after construction, so gathers are cached

    def project(self, values):
        """Apply the sliding landmarks' normal projections to (B, L, 2, ...) values."""
        if self.projection is None:
            return values
        out = values.clone()
        out[:, self.sliding_index] = torch.einsum("bsij,bsj...->bsi...", self.projection,
                                                  values[:, self.sliding_index])
        return out

    def gather(self, table):
        """Interpolate rows of ``table`` (U, ...) -> (B, L, ...)."""
        key = id(table)
        if key not in self._gathered:
            values = table[self.first]
            if self.sliding_index is not None:  # only sliding landmarks sit between two vertices
                slots = self.sliding_index
                w = self.weight[:, slots].reshape(*self.weight.shape[:1], -1, *([1] * (table.ndim - 1)))
                values[:, slots] += w * (table[self.second[:, slots]] - values[:, slots])
            self._gathered[key] = (table, values)
        return self._gathered[key][1]

    def choose(self, take_other, other):
        """Per frame, ``other``'s anchors where ``take_other`` (B,) is set, else these."""
        def pick(mine, theirs):
            return torch.where(take_other.reshape(-1, *([1] * (mine.ndim - 1))), theirs, mine)
        mine = self.projection
        if mine is None:
            mine = torch.eye(2, dtype=other.projection.dtype, device=other.projection.device).expand_as(other.projection)
        chosen = _Anchors(pick(self.first, other.first), pick(self.second, other.second),
                          pick(self.weight, other.weight), other.sliding_index, pick(mine, other.projection))
        # Carry over gathers both sides already hold, instead of gathering again.
        for key, (table, values) in self._gathered.items():
            if key in other._gathered:
                chosen._gathered[key] = (table, pick(values, other._gathered[key][1]))
        return chosen

    def nearest(self):
        """(B, L) position of the nearer of the two vertices."""
        return torch.where(self.weight < 0.5, self.first, self.second)


def _model_points(bases, anchors, alpha, beta, landmarks=True):
    """Model-space points (B, L, 3) at the anchors for alpha (B, Ki), beta (B, Ke).

    ``landmarks``: the anchors are the 68 landmarks (their offsets apply), not contour candidates.
    """
    shape = anchors.gather(bases.mean)
    if landmarks and bases.offsets is not None:
        shape = shape + bases.offsets
    # einsum, not batched @ of (3, K) x (K, 1): one large product instead of B*L tiny ones.
    shape = shape + torch.einsum("blck,bk->blc", anchors.gather(bases.id_basis), alpha)
    return shape + torch.einsum("blck,bk->blc", anchors.gather(bases.exp_basis), beta)


def _robust_cost(squared, huber):
    """rho of squared residual lengths (in sigmas^2): s, or Huber's 2k|r| - k^2 beyond k."""
    if huber is None:
        return squared
    length = squared.clamp_min(1e-30).sqrt()
    return torch.where(length <= huber, squared, 2 * huber * length - huber * huber)


def _huber_weight(squared, huber):
    """IRLS weight rho'(s) of Huber's loss: 1 inside the threshold, k/|r| beyond."""
    return (huber / squared.clamp_min(1e-30).sqrt()).clamp_max(1.0)


def _project(points, rotation, scale, translation):
    """(B, L, 3) model points -> (B, L, 2) pixels."""
    rotated = points @ rotation.transpose(-1, -2)
    flipped = torch.stack([rotated[..., 0], -rotated[..., 1]], -1)
    return scale[:, None, None] * flipped + translation[:, None, :]


def _slide_contours(bases, anchors, landmarks, alpha, beta, rotation, scale, translation):
    """Move each sliding landmark to the nearest point of its projected contour polyline."""
    if not bases.sliding:
        return anchors
    first, second, weight = anchors.first.clone(), anchors.second.clone(), anchors.weight.clone()
    batch = first.shape[0]
    sliding_index = torch.tensor([k for k, _ in bases.sliding], device=first.device)
    projection = torch.empty(batch, len(bases.sliding), 2, 2, dtype=landmarks.dtype, device=landmarks.device)
    polylines = {}
    for slot, (k, side_number) in enumerate(bases.sliding):
        side = bases.sides[side_number]
        if side_number not in polylines:
            cand = side[None].expand(batch, -1)
            zeros = torch.zeros(cand.shape, dtype=landmarks.dtype, device=landmarks.device)
            polylines[side_number] = _project(_model_points(bases, _Anchors(cand, cand, zeros), alpha, beta,
                                                            landmarks=False), rotation, scale, translation)  # (B, C, 2)
        projected = polylines[side_number]
        start, direction = projected[:, :-1], projected[:, 1:] - projected[:, :-1]
        offset = landmarks[:, k, None, :] - start
        t = ((offset * direction).sum(-1) / direction.square().sum(-1).clamp_min(1e-12)).clamp(0, 1)
        distance = (offset - t[..., None] * direction).square().sum(-1)
        segment = distance.argmin(-1)
        first[:, k] = side[segment]
        second[:, k] = side[segment + 1]
        weight[:, k] = t.gather(1, segment[:, None]).squeeze(1)
        tangent = direction.gather(1, segment[:, None, None].expand(-1, 1, 2)).squeeze(1)
        tangent = tangent / tangent.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        projection[:, slot] = torch.eye(2, dtype=tangent.dtype, device=tangent.device) - tangent[:, :, None] * tangent[:, None, :]
    return _Anchors(first, second, weight, sliding_index, projection)


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
    dtype, device = landmarks.dtype, landmarks.device
    batch, num_landmarks = anchors.first.shape
    points = _model_points(bases, anchors, alpha, beta)
    s = log_scale.exp()
    rotated = points @ rotation.transpose(-1, -2)
    residual = _project(points, rotation, s, translation) - landmarks  # (B, L, 2)
    residual = anchors.project(residual)
    # d(R X)/dd = -[R X]x; image x is +s*(R X)_x, image y is -s*(R X)_y.
    wx, wy, wz = rotated.unbind(-1)
    zero = torch.zeros_like(wx)
    s4 = s[:, None, None, None]
    jac_rot = s4 * torch.stack([torch.stack([zero, wz, -wy], -1), torch.stack([wz, zero, -wx], -1)], -2)
    jac_scale = s4 * torch.stack([wx, -wy], -1)[..., None]
    jac_trans = torch.eye(2, dtype=dtype, device=device).expand(batch, num_landmarks, 2, 2)
    projection_rows = s[:, None, None] * torch.stack([rotation[:, 0], -rotation[:, 1]], 1)  # (B, 2, 3)
    jac_exp = torch.einsum("bij,bljk->blik", projection_rows, anchors.gather(bases.exp_basis))  # (B, L, 2, Ke)
    jac_id = torch.einsum("bij,bljk->blik", projection_rows, anchors.gather(bases.id_basis))  # (B, L, 2, Ki)
    jac_frame = anchors.project(torch.cat([jac_rot, jac_scale, jac_trans, jac_exp], -1))
    jac_id = anchors.project(jac_id)
    weight = row_weight[..., None, None]
    return ((residual * row_weight[..., None]).flatten(1), (jac_frame * weight).flatten(1, 2),
            (jac_id * weight).flatten(1, 2))
