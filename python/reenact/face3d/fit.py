"""Batched Levenberg-Marquardt fit of a morphable model to 2D 68-point landmarks.

Unknowns, for B frames grouped into C clips:
  - per frame: rotation (axis-angle increments on a rotation matrix, so no gimbal lock), log
    scale, 2D translation, expression ``beta`` (Ke);
  - per clip: one identity ``alpha`` (Ki) shared by all its frames.

Cost (halved, every term dimensionless):

    sum_f sum_k c_fk rho(|project_f(v_fk + o_k) - l_fk|^2 / sigma_f^2)
        + id_prior * n_c |alpha|^2 + exp_prior |beta|^2

with ``c`` the landmark confidences, ``sigma_f = landmark_sigma * (landmark box diagonal)`` (so
the priors mean the same thing at every image resolution), ``o_k`` an optional per-landmark
offset in model space (the calibrated difference between a detector's point and the model's
vertex, see :mod:`reenact.face3d.calibration`), and ``rho`` the squared loss or, with
``huber=k``, Huber's loss on the landmark's residual length in sigmas (quadratic up to ``k``,
linear beyond, so one wrong landmark cannot drag the shape; solved by iteratively reweighted
least squares inside LM). ``n_c`` is 1 (one prior per clip: the exact MAP for independent
landmark noise, as on synthetic data) or, with ``id_prior_per_frame``, the number of frames of
clip c. Real detectors' errors are strongly correlated from frame to frame (the detector's bias,
the model's own landmark definitions), so a clip of 150 frames does not tell 150 times more about
the identity than one frame, and a per-clip prior is outweighed 150:1; the calibrated options of
:mod:`reenact.face3d.calibration`, which real-video callers use, turn it on. Each iteration solves the damped normal
equations with a Schur complement: the per-frame (6 + Ke) blocks are eliminated in one batched
Cholesky solve, leaving one Ki x Ki system per clip. Contour landmarks slide: where the model has
contour candidates, each outline landmark is re-assigned every iteration to the candidate vertex
whose projection is nearest to it.

The z translation is unobservable from 2D landmarks; it is set to 0.
"""
import copy
import dataclasses

import numpy as np
import torch

from .morphable import NUM_LANDMARKS, as_tensor
from .pose import axis_angle_to_matrix, compose_pose

# iBUG-68 index groups used for sizes and quality.
RIGHT_EYE = slice(36, 42)
LEFT_EYE = slice(42, 48)
_FRAME_POSE_PARAMS = 6  # rotation (3), log scale (1), translation x, y (2)


@dataclasses.dataclass
class FitResult:
    """Output of :func:`fit_landmarks`. Tensors are on the fitting device, float32 unless noted.

    alpha: (B, Ki) identity of each frame (its clip's shared identity).
    clip_alpha: (C, Ki) one identity per clip.
    beta: (B, Ke) expression per frame.
    pose: (B, 3, 4) image-space poses ``[s*F@R | t]`` (z translation 0).
    rotation: (B, 3, 3); scale: (B,) pixels per model unit; translation: (B, 3) pixels.
    projected: (B, 68, 2) fitted landmark positions in pixels.
    residuals: (B, 68, 2) projected - observed, pixels; 0 where a landmark has no weight.
    rms_px: (B,) confidence-weighted RMS reprojection error in pixels.
    rms_iod: (B,) rms_px divided by the observed inter-ocular distance.
    ok: (B,) bool quality flag: finite and rms_iod below the threshold.
    landmark_vertices: (B, 68) int64 model vertex nearest each fitted landmark (after sliding),
        -1 for landmarks the model does not define (their residuals are 0).
    iterations: int, LM iterations run.
    """

    alpha: torch.Tensor
    clip_alpha: torch.Tensor
    beta: torch.Tensor
    pose: torch.Tensor
    rotation: torch.Tensor
    scale: torch.Tensor
    translation: torch.Tensor
    projected: torch.Tensor
    residuals: torch.Tensor
    rms_px: torch.Tensor
    rms_iod: torch.Tensor
    ok: torch.Tensor
    landmark_vertices: torch.Tensor
    iterations: int

    def numpy(self):
        """A dict of numpy arrays (for ``np.savez``)."""
        return {f.name: (getattr(self, f.name).detach().cpu().numpy()
                         if torch.is_tensor(getattr(self, f.name)) else np.asarray(getattr(self, f.name)))
                for f in dataclasses.fields(self)}


# -- input checks --------------------------------------------------------------------------------

def check_landmarks(landmarks, confidence=None):
    """Validate landmarks (B, 68, 2) or (68, 2) and confidences (B, 68), (68,) or None.

    Returns float64 CPU-or-same-device tensors (B, 68, 2) and (B, 68). NaN or infinite landmark
    coordinates are rejected with a ValueError naming the frames; a landmark that is absent must
    be given a finite placeholder and confidence 0.
    """
    landmarks = as_tensor("landmarks", landmarks, torch.float64, "(B, 68, 2)")
    if landmarks.ndim == 2:
        landmarks = landmarks[None]
    if landmarks.ndim != 3 or landmarks.shape[1:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"landmarks must have shape (B, 68, 2) or (68, 2), got {tuple(landmarks.shape)}")
    bad = ~torch.isfinite(landmarks).all(dim=(1, 2))
    if bad.any():
        frames = bad.nonzero().flatten().tolist()
        raise ValueError(f"landmarks contain NaN or infinite values in frames {frames[:10]}")
    batch = landmarks.shape[0]
    if confidence is None:
        confidence = torch.ones(batch, NUM_LANDMARKS, dtype=torch.float64, device=landmarks.device)
    else:
        confidence = as_tensor("confidence", confidence, torch.float64, "(B, 68)").to(landmarks.device)
        if confidence.ndim == 1:
            confidence = confidence[None].expand(batch, -1)
        if confidence.shape != (batch, NUM_LANDMARKS):
            raise ValueError(f"confidence must have shape ({batch}, 68) or (68,), got {tuple(confidence.shape)}")
        if not torch.isfinite(confidence).all() or (confidence < 0).any():
            raise ValueError("confidence must be finite and non-negative")
    return landmarks, confidence.contiguous()


def _check_clip_index(clip_index, batch, device):
    if clip_index is None:
        return torch.zeros(batch, dtype=torch.int64, device=device), 1
    clip_index = torch.as_tensor(clip_index, device=device)
    if clip_index.shape != (batch,) or clip_index.is_floating_point():
        raise ValueError(f"clip_index must be an integer tensor of shape ({batch},), got {tuple(clip_index.shape)}")
    if batch and clip_index.min() < 0:
        raise ValueError("clip_index must be non-negative")
    unique, dense = torch.unique(clip_index, return_inverse=True)
    return dense.to(torch.int64), int(unique.numel())


# -- geometry helpers ----------------------------------------------------------------------------

def inter_ocular_distance(landmarks):
    """Distance between the eye centres of iBUG-68 landmarks (..., 68, 2) -> (...,)."""
    return (landmarks[..., RIGHT_EYE, :].mean(-2) - landmarks[..., LEFT_EYE, :].mean(-2)).norm(dim=-1)


def _box_diagonal(landmarks, confidence):
    """Diagonal of the box around the confident landmarks, (B,)."""
    present = (confidence > 0)[..., None]
    big = torch.finfo(landmarks.dtype).max
    low = torch.where(present, landmarks, big).amin(1)
    high = torch.where(present, landmarks, -big).amax(1)
    diagonal = (high - low).norm(dim=-1)
    return torch.where(present.any(1).squeeze(-1), diagonal, torch.ones_like(diagonal))


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


def fit_landmarks(model, landmarks, confidence=None, clip_index=None, *, id_prior=1.0,
                  exp_prior=1.0, landmark_sigma=0.005, max_iterations=60, tolerance=1e-7,
                  quality_threshold=0.08, id_prior_per_frame=False, huber=None, landmark_offsets=None,
                  device=None, dtype=torch.float64):
    """Fit pose, per-frame expression and per-clip identity to 68-point landmarks.

    Args:
        model: a :class:`~reenact.face3d.morphable.MorphableModel`.
        landmarks: (B, 68, 2) or (68, 2) pixel positions, iBUG order; must be finite.
        confidence: (B, 68), (68,) or None (all 1): per-landmark weights >= 0.
        clip_index: (B,) integer clip id of each frame, or None (all frames one clip, sharing one
            identity). ``torch.arange(B)`` fits every frame on its own.
        id_prior, exp_prior: Tikhonov weights on |alpha|^2 and |beta|^2 (coefficients are ~N(0,1)).
        id_prior_per_frame: weigh the identity prior by the clip's frame count (see the module
            docstring); False (default) gives the plain per-clip prior.
        huber: None (squared loss) or the Huber threshold, in units of ``landmark_sigma``.
        landmark_offsets: None or (68, 3) model-space offsets added to the model's landmark
            points (fixed landmarks only; sliding outline points ignore them).
        landmark_sigma: assumed landmark noise as a fraction of the landmark box diagonal.
        max_iterations, tolerance: LM stopping rule (relative cost decrease per clip).
        quality_threshold: largest rms_px / inter-ocular distance for which ``ok`` is True.
        device, dtype: where and in which precision to solve (default: the landmarks' device,
            float64). float32 is fine on GPUs.
    Returns:
        :class:`FitResult`.
    """
    if getattr(model, "dense", False):
        raise ValueError(f"the {model.name!r} model is fitted to mediapipe's dense face mesh "
                         "(model.fit_dense), not to 68 landmarks")
    if isinstance(landmarks, torch.Tensor) and device is None:
        device = landmarks.device
    device = torch.device(device if device is not None else model.device)
    landmarks, confidence = check_landmarks(landmarks, confidence)
    for name, value in (("id_prior", id_prior), ("exp_prior", exp_prior), ("landmark_sigma", landmark_sigma)):
        if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if landmark_sigma <= 0:
        raise ValueError("landmark_sigma must be > 0")
    if huber is not None and not (isinstance(huber, (int, float)) and np.isfinite(huber) and huber > 0):
        raise ValueError(f"huber must be None or a finite number > 0, got {huber!r}")
    landmarks = landmarks.to(device=device, dtype=dtype)
    batch = landmarks.shape[0]
    clip_index, num_clips = _check_clip_index(clip_index, batch, device)
    bases = _LandmarkBases(model, dtype, device, landmark_offsets)
    weights = confidence.to(device=device, dtype=dtype) * bases.defined.to(dtype)
    sigma = landmark_sigma * _box_diagonal(landmarks, weights)
    full_row_weight = weights.sqrt() / sigma[:, None]  # (B, L) multiplies both coordinates
    num_id, num_exp = model.num_id, model.num_exp
    eye_id = torch.eye(num_id, dtype=dtype, device=device)
    clip_frames = torch.zeros(num_clips, dtype=dtype, device=device).index_add_(
        0, clip_index, torch.ones(batch, dtype=dtype, device=device))
    clip_id_prior = id_prior * clip_frames if id_prior_per_frame else torch.full_like(clip_frames, id_prior)

    start = bases.default_position[None].expand(batch, -1).clone()
    anchors = _Anchors(start, start, torch.zeros(start.shape, dtype=dtype, device=device))
    fixed_weights = weights * (model.landmarks68.to(device) >= 0).to(dtype)
    rotation, scale, translation = _affine_initial_pose(bases, anchors, landmarks, fixed_weights)
    log_scale = scale.log()
    alpha = torch.zeros(num_clips, num_id, dtype=dtype, device=device)
    beta = torch.zeros(batch, num_exp, dtype=dtype, device=device)

    def evaluate(anch, rotated_vertices, rot, scale, trans, row_weight):
        """Rotated landmarks (B, L, 3), normal-projected residuals (B, L, 2), squared weighted
        residual lengths (B, L) and each frame's robust data cost (B,) at the anchors."""
        rotated = _rotated_landmarks(bases, anch, rotated_vertices, rot)
        residual = anch.project(_to_image(rotated, scale, trans) - landmarks)
        squared = _dot2(residual, residual) * row_weight.square()  # in sigmas^2
        return rotated, residual, squared, _robust_cost(squared, huber).sum(-1)

    def rotated_vertices_at(rot, frame_alpha, bet):
        return _vertex_points(bases, frame_alpha, bet) @ rot.transpose(-1, -2)

    def clip_cost(data, alph, bet):
        frame = 0.5 * (data + exp_prior * bet.square().sum(-1))
        cost = torch.zeros(num_clips, dtype=dtype, device=device).index_add_(0, clip_index, frame)
        return cost + 0.5 * clip_id_prior * alph.square().sum(-1)

    # Stage 1 fits the fixed landmarks only; stage 2 adds the sliding outline. Sliding from the
    # crude initial pose would let outline points lock onto the wrong part of the contour.
    stages = [(full_row_weight, max_iterations)]
    if bases.sliding:
        stages.insert(0, (full_row_weight * fixed_weights.gt(0).to(dtype), max(1, max_iterations // 3)))
    iterations = 0
    for row_weight, stage_iterations in stages:
        damping = torch.full((num_clips,), 1e-3, dtype=dtype, device=device)
        active = torch.ones(num_clips, dtype=torch.bool, device=device)
        for _ in range(stage_iterations):
            iterations += 1
            scale = log_scale.exp()
            rotated_vertices = rotated_vertices_at(rotation, alpha[clip_index], beta)
            rotated, residual, squared, data = evaluate(anchors, rotated_vertices, rotation, scale, translation,
                                                        row_weight)
            if bases.sliding:
                # Re-slide, but keep a frame's previous anchors when sliding would raise its
                # cost: nearest-point and normal-distance costs differ, and without this guard
                # an outline point can flip between two segments forever.
                slid = _slide_contours(bases, anchors, landmarks, _to_image(rotated_vertices, scale, translation))
                slid_values = evaluate(slid, rotated_vertices, rotation, scale, translation, row_weight)
                take = slid_values[3] <= data
                anchors = anchors.choose(take, slid)
                rotated, residual, squared, data = (
                    torch.where(take.reshape(-1, *([1] * (mine.ndim - 1))), theirs, mine)
                    for mine, theirs in zip((rotated, residual, squared, data), slid_values))
            cost = clip_cost(data, alpha, beta)

            step_weight = row_weight
            if huber is not None:  # IRLS: Huber's weights at the current residuals
                step_weight = row_weight * _huber_weight(squared, huber).sqrt()
            res, jac_frame, jac_id = _weighted_jacobians(bases, anchors, rotated, residual, step_weight,
                                                         rotation, scale)

            num_frame = jac_frame.shape[-1]
            h_ff = jac_frame.transpose(1, 2) @ jac_frame
            g_f = (jac_frame.transpose(1, 2) @ res[..., None]).squeeze(-1)
            exp_slice = slice(_FRAME_POSE_PARAMS, num_frame)
            h_ff[:, exp_slice, exp_slice] += exp_prior * torch.eye(num_exp, dtype=dtype, device=device)
            g_f[:, exp_slice] += exp_prior * beta
            h_fa = jac_frame.transpose(1, 2) @ jac_id  # (B, nf, Ki)
            h_aa_frame = jac_id.transpose(1, 2) @ jac_id
            g_a_frame = (jac_id.transpose(1, 2) @ res[..., None]).squeeze(-1)
            h_aa = torch.zeros(num_clips, num_id, num_id, dtype=dtype, device=device).index_add_(0, clip_index, h_aa_frame)
            h_aa = h_aa + clip_id_prior[:, None, None] * eye_id
            g_a = torch.zeros(num_clips, num_id, dtype=dtype, device=device).index_add_(0, clip_index, g_a_frame)
            g_a = g_a + clip_id_prior[:, None] * alpha

            # Marquardt damping, scaled by each diagonal (so rotation, pixels and coefficients mix).
            frame_damping = damping[clip_index][:, None]
            diag_f = h_ff.diagonal(dim1=1, dim2=2)
            h_ff_damped = h_ff + torch.diag_embed(frame_damping * (diag_f + 1e-9))
            diag_a = h_aa.diagonal(dim1=1, dim2=2)
            h_aa_damped = h_aa + torch.diag_embed(damping[:, None] * (diag_a + 1e-9))

            # Schur complement: eliminate the per-frame blocks.
            chol, info = torch.linalg.cholesky_ex(h_ff_damped)
            if (info > 0).any():
                h_ff_damped = h_ff_damped + torch.diag_embed((info > 0).to(dtype)[:, None] * (diag_f.abs().amax(-1, keepdim=True) + 1.0) * 1e-6)
                chol = torch.linalg.cholesky(h_ff_damped)
            solved = torch.cholesky_solve(torch.cat([h_fa, g_f[..., None]], -1), chol)  # (B, nf, Ki+1)
            reduce_h = h_fa.transpose(1, 2) @ solved  # (B, Ki, Ki+1)
            reduce_h = torch.zeros(num_clips, num_id, num_id + 1, dtype=dtype, device=device).index_add_(0, clip_index, reduce_h)
            schur = h_aa_damped - reduce_h[..., :num_id]
            schur = 0.5 * (schur + schur.transpose(1, 2))
            rhs = g_a - reduce_h[..., num_id]
            step_alpha = -torch.linalg.solve(schur, rhs[..., None]).squeeze(-1)  # (C, Ki)
            step_frame = -(solved[..., num_id] + (solved[..., :num_id] @ step_alpha[clip_index][..., None]).squeeze(-1))

            new_rotation = axis_angle_to_matrix(step_frame[:, :3]) @ rotation
            new_log_scale = log_scale + step_frame[:, 3]
            new_translation = translation + step_frame[:, 4:6]
            new_beta = beta + step_frame[:, _FRAME_POSE_PARAMS:]
            new_alpha = alpha + step_alpha
            new_data = evaluate(anchors, rotated_vertices_at(new_rotation, new_alpha[clip_index], new_beta),
                                new_rotation, new_log_scale.exp(), new_translation, row_weight)[3]
            new_cost = clip_cost(new_data, new_alpha, new_beta)

            accept = (new_cost < cost) & torch.isfinite(new_cost) & active
            frame_accept = accept[clip_index]
            rotation = torch.where(frame_accept[:, None, None], new_rotation, rotation)
            log_scale = torch.where(frame_accept, new_log_scale, log_scale)
            translation = torch.where(frame_accept[:, None], new_translation, translation)
            beta = torch.where(frame_accept[:, None], new_beta, beta)
            alpha = torch.where(accept[:, None], new_alpha, alpha)
            damping = torch.where(accept, (damping / 3.0).clamp_min(1e-9), damping * 5.0)

            small_change = (cost - new_cost).abs() <= tolerance * cost.clamp_min(1e-30)
            # A step that changes the cost by a negligible amount, taken or not, means convergence.
            active = active & ~small_change & (damping < 1e10)
            if not active.any():
                break

    scale = log_scale.exp()
    rotated_vertices = rotated_vertices_at(rotation, alpha[clip_index], beta)
    anchors = _slide_contours(bases, anchors, landmarks, _to_image(rotated_vertices, scale, translation))
    projected = _to_image(_rotated_landmarks(bases, anchors, rotated_vertices, rotation), scale, translation)
    used_weight = (weights > 0).to(dtype)
    residuals = (projected - landmarks) * used_weight[..., None]
    rms_px = ((residuals.square().sum(-1) * weights).sum(-1) / weights.sum(-1).clamp_min(1e-30)).sqrt()
    iod = inter_ocular_distance(landmarks)
    rms_iod = rms_px / iod.clamp_min(1e-9)
    ok = torch.isfinite(rms_iod) & (rms_iod < quality_threshold) & (weights.sum(-1) > 0)
    translation3 = torch.cat([translation, torch.zeros_like(translation[:, :1])], -1)
    out = torch.float32
    return FitResult(
        alpha=alpha[clip_index].to(out), clip_alpha=alpha.to(out), beta=beta.to(out),
        pose=compose_pose(rotation, scale, translation3).to(out), rotation=rotation.to(out),
        scale=scale.to(out), translation=translation3.to(out), projected=projected.to(out),
        residuals=residuals.to(out), rms_px=rms_px.to(out), rms_iod=rms_iod.to(out), ok=ok,
        landmark_vertices=torch.where(bases.defined, bases.used[anchors.nearest()], -1), iterations=iterations,
    )


def fit_clip(model, landmarks, confidence=None, identity_stride=4, **options):
    """Fit one clip: its identity from every ``identity_stride``-th frame, then every frame's pose
    and expression with that identity fixed.

    Consecutive frames repeat each other's landmark errors, so a quarter of a clip's frames gives
    the identity as well as all of them (measured on real clips: bench/RESULTS.md), and the
    per-frame fits without identity unknowns cost a fraction of the joint fit. Returns a
    :class:`FitResult` for all frames. ``options`` go to :func:`fit_landmarks` (one clip: no
    ``clip_index``).
    """
    landmarks, confidence = check_landmarks(landmarks, confidence)
    if identity_stride <= 1 or len(landmarks) < 2 * identity_stride:
        return fit_landmarks(model, landmarks, confidence, **options)
    identity = fit_landmarks(model, landmarks[::identity_stride], confidence[::identity_stride], **options)
    alpha = identity.clip_alpha[0].to(model.id_basis)
    fixed = copy.copy(model)  # the identity folded into the mean: nothing left to fit but the frames
    fixed.mean = model.mean + torch.einsum("vck,k->vc", model.id_basis, alpha)
    fixed.id_basis = model.id_basis[..., :0]
    frames = fit_landmarks(fixed, landmarks, confidence, **options)
    batch = len(landmarks)
    return dataclasses.replace(frames, alpha=alpha[None].expand(batch, -1).clone(), clip_alpha=alpha[None].clone())
