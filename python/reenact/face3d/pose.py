"""Poses: 3x4 matrices ``[s*R | t]`` from model space to image space, with the y flip folded in.

Model space is right-handed: x right, y up, z towards the viewer. Image space (the project
convention) has x right in pixels, y down in pixels and larger z nearer the camera. A pose is

    image = s * F @ R @ model + t,        F = diag(1, -1, 1)

with ``R`` a proper rotation (det +1), ``s > 0`` pixels per model unit and ``t`` (3,) pixels.
The 3x3 block ``s * F @ R`` therefore has a negative determinant. 3DDFA_V2's 12 pose parameters,
once its crop (``similar_transform``) is folded in, are exactly such a matrix.

Rotations are parametrised by axis-angle vectors (radians) wherever they are optimised, so no
parametrisation singularity (gimbal lock) exists at any pose.
"""
import torch

#: The y flip between model space (y up) and image space (y down).
Y_FLIP = (1.0, -1.0, 1.0)


def _flip(like):
    return torch.tensor(Y_FLIP, dtype=like.dtype, device=like.device)


def skew(vectors):
    """Cross-product matrices: ``skew(a) @ b == cross(a, b)``. (..., 3) -> (..., 3, 3)."""
    x, y, z = vectors.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack(
        [zero, -z, y, z, zero, -x, -y, x, zero], dim=-1
    ).reshape(*vectors.shape[:-1], 3, 3)


def axis_angle_to_matrix(rotvec):
    """Rodrigues' formula. rotvec (..., 3) radians -> rotation matrices (..., 3, 3).

    Stable at zero angle: the sin(a)/a and (1-cos(a))/a^2 factors use their Taylor series there.
    """
    angle_sq = (rotvec * rotvec).sum(-1, keepdim=True)[..., None]
    angle = angle_sq.clamp_min(1e-30).sqrt()
    small = angle_sq < 1e-8
    sin_over_angle = torch.where(small, 1.0 - angle_sq / 6.0, torch.sin(angle) / angle)
    one_minus_cos_over_sq = torch.where(
        small, 0.5 - angle_sq / 24.0, (1.0 - torch.cos(angle)) / angle_sq.clamp_min(1e-30)
    )
    k = skew(rotvec)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand_as(k)
    return eye + sin_over_angle * k + one_minus_cos_over_sq * (k @ k)


def matrix_to_axis_angle(rotation):
    """Inverse of :func:`axis_angle_to_matrix` for proper rotations. (..., 3, 3) -> (..., 3).

    Uses the quaternion route, which stays accurate near 0 and near pi radians.
    """
    quat = matrix_to_quaternion(rotation)
    w, xyz = quat[..., :1], quat[..., 1:]
    # Pick the hemisphere w >= 0 so that the angle is in [0, pi].
    sign = torch.where(w < 0, -1.0, 1.0).to(rotation.dtype)
    w, xyz = w * sign, xyz * sign
    sin_half = xyz.norm(dim=-1, keepdim=True)
    half_angle = torch.atan2(sin_half, w)
    scale = torch.where(sin_half < 1e-8, 2.0 / w.clamp_min(1e-30), 2.0 * half_angle / sin_half.clamp_min(1e-30))
    return xyz * scale


def matrix_to_quaternion(rotation):
    """Rotation matrices (..., 3, 3) -> unit quaternions (..., 4) as (w, x, y, z)."""
    m = rotation
    trace = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    # Four candidate formulas; each is well conditioned where its divisor is largest.
    candidates = torch.stack(
        [
            torch.stack([1 + trace, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
            torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2], m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
            torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2, 1]], -1),
            torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1),
        ],
        dim=-2,
    )
    best = torch.stack([trace, m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]], -1).argmax(-1)
    quat = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    return quat / quat.norm(dim=-1, keepdim=True)


def compose_pose(rotation, scale, translation):
    """Build 3x4 image-space poses.

    Args:
        rotation: (..., 3, 3) proper rotations in model space.
        scale: (...,) pixels per model unit.
        translation: (..., 3) or (..., 2) pixels; a missing z translation is 0.
    Returns:
        (..., 3, 4) poses ``[s * F @ R | t]``.
    """
    if translation.shape[-1] == 2:
        translation = torch.cat([translation, torch.zeros_like(translation[..., :1])], -1)
    linear = scale[..., None, None] * _flip(rotation)[:, None] * rotation
    return torch.cat([linear, translation[..., None]], dim=-1)


def decompose_pose(pose):
    """Split 3x4 poses into (rotation (...,3,3), scale (...,), translation (...,3)).

    The linear block is brought to the nearest ``s * F @ R`` (polar decomposition), so poses that
    carry slightly anisotropic scales (3DDFA_V2 crops that are not square) still decompose.
    """
    linear = pose[..., :3] * _flip(pose)[:, None]
    u, sigma, vh = torch.linalg.svd(linear)
    # Force a proper rotation: flip the last singular direction if the product is a reflection.
    det = torch.linalg.det(u @ vh)
    fix = torch.ones_like(sigma)
    fix[..., 2] = torch.where(det < 0, -1.0, 1.0)
    rotation = u @ (fix[..., :, None] * vh)
    scale = sigma.mean(-1)
    return rotation, scale, pose[..., 3].clone()


def apply_pose(vertices, pose):
    """Model-space vertices (B|1, V, 3) and poses (B, 3, 4) -> image-space vertices (B, V, 3)."""
    return vertices @ pose[..., :3].transpose(-1, -2) + pose[..., None, :, 3]


def rotation_angle_between(rotation_a, rotation_b):
    """Geodesic angle in degrees between rotations (..., 3, 3) -> (...,)."""
    relative = rotation_a @ rotation_b.transpose(-1, -2)
    cos = ((relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))


def euler_to_matrix(yaw, pitch, roll):
    """Rotations from yaw (about y), pitch (about x) and roll (about z), in degrees.

    Only a convenience for building test poses and reading results; the fitter never uses Euler
    angles. Returns (..., 3, 3) float64 as ``Rz(roll) @ Rx(pitch) @ Ry(yaw)``.
    """
    yaw, pitch, roll = (torch.deg2rad(torch.as_tensor(a, dtype=torch.float64)) for a in (yaw, pitch, roll))
    zeros = torch.zeros_like(yaw)
    axis_y = torch.stack([zeros, yaw, zeros], -1)
    axis_x = torch.stack([pitch, zeros, zeros], -1)
    axis_z = torch.stack([zeros, zeros, roll], -1)
    return axis_angle_to_matrix(axis_z) @ axis_angle_to_matrix(axis_x) @ axis_angle_to_matrix(axis_y)


def relative_pose(pose_drv, pose_ref, pose_src):
    """Apply the driving pose change (relative to a reference driving frame) to a source pose.

    With each pose split into (R, s, t):
      - rotation: ``R = (R_drv @ R_ref^T) @ R_src`` (the change, applied in camera space);
      - scale: ``s = s_src * s_drv / s_ref``;
      - translation: ``t = t_src + (t_drv - t_ref) * s_src / s_ref``, so a source face that is
        smaller in its crop moves proportionally less.

    All arguments are (B|1, 3, 4) and broadcast; returns (B, 3, 4).
    """
    rot_drv, scale_drv, trans_drv = decompose_pose(pose_drv)
    rot_ref, scale_ref, trans_ref = decompose_pose(pose_ref)
    rot_src, scale_src, trans_src = decompose_pose(pose_src)
    ratio = scale_drv / scale_ref
    rotation = rot_drv @ rot_ref.transpose(-1, -2) @ rot_src
    translation = trans_src + (trans_drv - trans_ref) * (scale_src / scale_ref)[..., None]
    return compose_pose(rotation, scale_src * ratio, translation)


__all__ = [
    "Y_FLIP", "skew", "axis_angle_to_matrix", "matrix_to_axis_angle", "matrix_to_quaternion",
    "compose_pose", "decompose_pose", "apply_pose", "rotation_angle_between", "euler_to_matrix",
    "relative_pose",
]
