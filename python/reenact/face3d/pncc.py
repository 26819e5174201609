"""Identity-matched PNCC reconstruction (the paper's step 2) and PNCC read-back.

``reconstruct_pncc`` builds the mesh of the *source* identity with the *driving* expression and
pose and renders its PNCC with ``pncc_cuda.render_pncc``. It is a plain function so that other
reenactment methods can call it.
"""
import torch

from ..validation import is_int
from .morphable import check_pose
from .pose import apply_pose, relative_pose

MODES = ("absolute", "relative")
#: How to build the op library (README, "Installing"); named wherever pncc_cuda fails to import.
BUILD_HINT = "build it with `pip install --no-build-isolation -e .` after torch (README, Installing)"


def _ops():
    try:
        import pncc_cuda  # optional until an op runs: reenact imports without the build
    except ImportError as err:
        raise ImportError(f"pncc_cuda's compiled ops are not available ({BUILD_HINT}): {err}") from err
    return pncc_cuda


def reconstruct_vertices(model, alpha_src, beta_drv, pose_drv, pose_src=None, pose_ref=None,
                         mode="absolute"):
    """Image-space vertices (B, V, 3) of the source identity with the driving expression and pose.

    See :func:`reconstruct_pncc` for the arguments.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    pose_drv = check_pose("pose_drv", pose_drv, device=model.device)
    alpha, beta = model.check_coefficients(alpha_src, beta_drv, batch=pose_drv.shape[0])
    batch = max(alpha.shape[0], pose_drv.shape[0])
    if mode == "relative":
        if pose_src is None or pose_ref is None:
            raise ValueError("mode='relative' needs pose_src and pose_ref")
        pose_src = check_pose("pose_src", pose_src, device=model.device)
        pose_ref = check_pose("pose_ref", pose_ref, device=model.device)
        for name, pose in (("pose_src", pose_src), ("pose_ref", pose_ref)):
            if pose.shape[0] not in (1, batch):
                raise ValueError(f"{name} must have batch size 1 or {batch}, got {pose.shape[0]}")
        pose = relative_pose(pose_drv, pose_ref, pose_src)
    else:
        pose = pose_drv
    pose = pose.expand(batch, 3, 4)
    alpha, beta = alpha.expand(batch, -1), beta.expand(batch, -1)
    return apply_pose(model.vertices(alpha, beta), pose)


def reconstruct_pncc(model, alpha_src, beta_drv, pose_drv, pose_src=None, pose_ref=None,
                     mode="absolute", size=256, ops=None):
    """Render the PNCC of the source identity with the driving expression and pose.

    Args:
        model: a :class:`~reenact.face3d.morphable.MorphableModel` (its device is used).
        alpha_src: (Ki,) or (B|1, Ki) source identity.
        beta_drv: (Ke,) or (B|1, Ke) driving expression.
        pose_drv: (3, 4) or (B|1, 3, 4) driving pose, image pixels of a ``size`` x ``size`` crop.
        pose_src: source pose, needed for ``mode="relative"``.
        pose_ref: pose of the reference driving frame (usually the first), needed for
            ``mode="relative"``.
        mode: ``"absolute"`` renders with ``pose_drv`` as it is; ``"relative"`` applies the change
            from ``pose_ref`` to ``pose_drv`` (rotation, scale, translation; see
            :func:`reenact.face3d.pose.relative_pose`) on top of ``pose_src``.
        size: output height and width in pixels.
        ops: what renders: anything with ``render_pncc`` of pncc_cuda's signature, e.g.
            ``reenact.model.get_ops("reference")`` for A/B runs; default the fused pncc_cuda op.
    Returns:
        pncc (B, 3, size, size) float32 in [0, 1] (0 on the background) and
        mask (B, 1, size, size) float32 coverage. Differentiable w.r.t. the coefficients and poses.
    """
    if not is_int(size) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    vertices = reconstruct_vertices(model, alpha_src, beta_drv, pose_drv, pose_src, pose_ref, mode)
    return render_model_pncc(model, vertices, size, size, ops)


def render_model_pncc(model, vertices, height, width, ops=None):
    """PNCC (B, 3, H, W) and mask (B, 1, H, W) of image-space vertices (B, V, 3) of `model`,
    rendered by ``ops.render_pncc`` (default: the fused pncc_cuda op)."""
    ops = _ops() if ops is None else ops
    return ops.render_pncc(vertices.contiguous(), model.faces, model.ncc, int(height), int(width))


def render_colors(model, vertices, size, colors=None):
    """Render per-vertex colours (default: the model's texture) -> (B, 3, H, W), mask (B, 1, H, W)."""
    colors = model.colors if colors is None else colors
    if colors is None:
        raise ValueError(f"model {model.name!r} has no per-vertex colours; pass colors")
    ops = _ops()
    face_index, bary, _ = ops.rasterize(vertices.contiguous(), model.faces, size, size)
    image = ops.interpolate(colors.to(vertices)[None], model.faces, face_index, bary)
    return image.permute(0, 3, 1, 2), (face_index >= 0)[:, None].to(vertices.dtype)


def locate_codes(pncc, mask, codes, max_code_distance=0.01, window=2):
    """Find where given NCC codes appear in PNCC images, with sub-pixel precision.

    The nearest-colour covered pixel is refined by fitting a local affine map from pixel offsets
    to code values over a (2*window+1)^2 neighbourhood and solving it for the target code.

    Args:
        pncc: (B, 3, H, W); mask: (B, 1, H, W); codes: (K, 3) NCC values (e.g. ``model.ncc[idx]``).
        max_code_distance: a code whose nearest pixel is farther than this (in NCC units) is
            reported as not found (hidden or outside the image).
    Returns:
        points (B, K, 2) pixel (x, y) positions and found (B, K) bool.
    """
    batch, _, height, width = pncc.shape
    covered = mask[:, 0] > 0.5
    flat = pncc.flatten(2).transpose(1, 2)  # (B, HW, 3)
    distance = torch.cdist(codes.to(flat)[None].expand(batch, -1, -1), flat)  # (B, K, HW)
    distance = distance.masked_fill(~covered.flatten(1)[:, None, :], float("inf"))
    best, index = distance.min(-1)
    rows, cols = index // width, index % width
    offsets = torch.arange(-window, window + 1, device=pncc.device)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    dy, dx = dy.flatten(), dx.flatten()
    sample_rows = (rows[..., None] + dy).clamp(0, height - 1)
    sample_cols = (cols[..., None] + dx).clamp(0, width - 1)
    batch_index = torch.arange(batch, device=pncc.device)[:, None, None]
    values = pncc.permute(0, 2, 3, 1)[batch_index, sample_rows, sample_cols]  # (B, K, N, 3)
    valid = covered[batch_index, sample_rows, sample_cols].to(pncc.dtype)  # (B, K, N)
    design = torch.stack([torch.ones_like(valid), (sample_cols - cols[..., None]).to(pncc.dtype),
                          (sample_rows - rows[..., None]).to(pncc.dtype)], -1)  # (B, K, N, 3)
    weighted = design * valid[..., None]
    normal = weighted.transpose(-1, -2) @ design + 1e-6 * torch.eye(3, device=pncc.device, dtype=pncc.dtype)
    coefficients = torch.linalg.solve(normal, weighted.transpose(-1, -2) @ values)  # (B, K, 3, 3)
    base, gradient = coefficients[..., 0, :], coefficients[..., 1:, :]  # (B,K,3), (B,K,2,3)
    target = codes.to(pncc)[None] - base
    step = torch.linalg.lstsq(gradient.transpose(-1, -2), target[..., None]).solution.squeeze(-1)
    step = step.clamp(-window, window)
    step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))
    points = torch.stack([cols.to(pncc.dtype), rows.to(pncc.dtype)], -1) + step
    return points, torch.isfinite(best) & (best < max_code_distance)
