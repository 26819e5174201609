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

from .landmark_model import (  # noqa: F401  (_Anchors, _LandmarkBases: the tests' entry points)
    _affine_initial_pose,
    _Anchors,
    _huber_weight,
    _LandmarkBases,
    _dot2,
    _robust_cost,
    _rotated_landmarks,
    _slide_contours,
    _to_image,
    _vertex_points,
    _weighted_jacobians,
    residuals_and_jacobians,
)
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
