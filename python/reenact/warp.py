"""Training-free geometric reenactment: the identity-matched driving mesh, read as a warp.

Identity-matched PNCC is a dense correspondence between the driving geometry and the source face.
The mesh gives it exactly and in O(pixels), with no code matching:

1. rasterize the identity-matched driving mesh P_d' (source identity, driving expression and pose);
2. interpolate, over its pixels, where each vertex lies in the *source* image -> a sampling grid;
3. a driving pixel whose source point is hidden in the source view (behind a nearer surface of the
   source z-buffer), or that lies on the mouth interior (``model.hole_faces``), is a hole;
4. ``grid_sample`` the source image.

Outside the face the displacement is extended smoothly and fades to zero, so hair and neck follow
the head a little instead of tearing at the mesh border.

:func:`geometric_reenact` is the entry point from fitted parameters; :func:`mesh_warp` works on any
pair of image-space meshes of one topology.
"""
import dataclasses

import torch
import torch.nn.functional as F

from .face3d.pncc import _ops as pncc_ops, reconstruct_vertices

#: A source point counts as hidden when it lies behind the nearest surface of the source z-buffer's
#: 3x3 neighbourhood (the minimum there) by more than this fraction of the source mesh's depth
#: range (about 5 mm on a face) and 2 pixels: less, and a surface seen at a grazing angle hides
#: itself; a nose hides the cheek behind it by ~30 mm.
DEPTH_TOLERANCE = 0.05
MIN_DEPTH_TOLERANCE_PX = 2.0
#: Outside the face, the displacement is the face's, smoothed over this fraction of the image
#: side, and fades out over about the same distance.
FILL_SIGMA = 0.06
#: The smoothing runs at 1/FILL_STRIDE resolution (it is a low-frequency field).
FILL_STRIDE = 4


@dataclasses.dataclass
class Warp:
    """A geometric reenactment.

    grid: (B, H, W, 2) where each output pixel samples the source, ``grid_sample`` coordinates
        (``align_corners=True``: -1 and 1 are the centres of the border pixels).
    source_xy: (B, H, W, 2) the same in source pixels (x, y).
    coverage: (B, 1, H, W) 1 where the driving mesh is visible.
    holes: (B, 1, H, W) 1 where no source pixel shows the driving surface: the point is hidden in
        the source view, or it is the mouth interior.
    mouth: (B, 1, H, W) 1 on the mouth interior (a subset of ``holes``).
    mouth_stretch: (B,) the mouth interior's area in the output over its area in the source (1
        without a mouth): above 1 the warp stretches what the source's mouth shows.
    image: (B, C, H, W) the warped source, or None when no image was given.
    """

    grid: torch.Tensor
    source_xy: torch.Tensor
    coverage: torch.Tensor
    holes: torch.Tensor
    mouth: torch.Tensor
    mouth_stretch: torch.Tensor
    image: torch.Tensor = None


def _ops():
    return pncc_ops()


def pixel_grid(height, width, like):
    """(H, W, 2) pixel centres (x, y) in the project convention: pixel (i, j) is the point (j, i)."""
    rows = torch.arange(height, dtype=like.dtype, device=like.device)
    cols = torch.arange(width, dtype=like.dtype, device=like.device)
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([x, y], -1)


def to_sampling_grid(points, height, width):
    """Pixels (x, y) -> ``grid_sample`` coordinates (align_corners=True) for an H x W source."""
    scale = points.new_tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])
    return points * scale - 1.0


def _blur_matrix(size, sigma, like):
    """(size, size) matrix of a normalised Gaussian blur along one axis, the border replicated:
    row i holds the weights of the taps i - r .. i + r, clamped into the axis."""
    radius = max(1, int(round(3 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    weights = weights / weights.sum()
    positions = torch.arange(size, device=like.device)[:, None] + torch.arange(-radius, radius + 1, device=like.device)
    matrix = torch.zeros(size, size, dtype=like.dtype, device=like.device)
    return matrix.scatter_add_(1, positions.clamp_(0, size - 1), weights.expand(size, -1).contiguous())


def _gaussian_blur(images, sigma):
    """Separable Gaussian blur of (B, C, H, W), border replicated, as two small matrix products
    (rows @ images @ columns^T): ~10x cheaper on the CPU than a depthwise convolution here."""
    height, width = images.shape[-2:]
    return _blur_matrix(height, sigma, images) @ images @ _blur_matrix(width, sigma, images).T


def _minimum_3x3(images):
    """Minimum over each pixel's 3x3 neighbourhood of (B, H, W), +inf outside: two separable
    passes of shifted minima (a 1x3 max_pool2d costs ~15x more on the CPU)."""
    padded = F.pad(images, (1, 1), value=float("inf"))
    rows = torch.minimum(torch.minimum(padded[..., :-2], padded[..., 1:-1]), padded[..., 2:])
    padded = F.pad(rows, (0, 0, 1, 1), value=float("inf"))
    return torch.minimum(torch.minimum(padded[..., :-2, :], padded[..., 1:-1, :]), padded[..., 2:, :])


def _gather_pixels(images, x, y, batch):
    """images (B|1, H, W) at the nearest pixel of the points (x, y), each (batch, h, w), clamped
    to the image: one flat gather (advanced indexing with three index tensors costs ~4x more)."""
    height, width = images.shape[-2:]
    flat = y.round().long().clamp_(0, height - 1).mul_(width).add_(x.round().long().clamp_(0, width - 1))
    return images.flatten(1).expand(batch, -1).gather(1, flat.flatten(1)).view_as(x)


def _per_face(flags, face_index):
    """(F,) bool per face -> (B, H, W) at a rasterized face index, False on the background (-1)."""
    lookup = torch.cat([flags.new_zeros(1), flags]).to(face_index.device)
    return lookup.take(face_index.long() + 1)


def extend_displacement(displacement, coverage):
    """Extend a displacement field (B, 2, H, W) known where ``coverage`` (B, 1, H, W) is 1:
    a normalised Gaussian average of the known values outside, faded by the local coverage."""
    height, width = displacement.shape[-2:]
    stride = FILL_STRIDE if min(height, width) >= 4 * FILL_STRIDE else 1
    small_d = F.avg_pool2d(displacement * coverage, stride)
    small_c = F.avg_pool2d(coverage, stride)
    sigma = max(1.0, FILL_SIGMA * max(height, width) / stride)
    blurred = _gaussian_blur(torch.cat([small_d, small_c], 1), sigma)
    weight = blurred[:, 2:]
    filled = blurred[:, :2] / weight.clamp_min(1e-6) * (2.0 * weight).clamp(max=1.0)
    # 1 deep inside the face, 0 outside, a ramp over a band of about FILL_STRIDE pixels inside the
    # border: the block-averaged coverage, upsampled, is that ramp at no extra cost.
    both = torch.cat([filled, small_c], 1)
    if stride > 1:
        both = F.interpolate(both, size=(height, width), mode="bilinear", align_corners=False)
    inside = both[:, 2:].mul(2.0).sub_(1.0).clamp_(0, 1).mul_(coverage)
    return torch.lerp(both[:, :2], displacement, inside)  # one pass over the full-resolution field


def mesh_warp(source_vertices, driving_vertices, faces, size, source_image=None, hole_faces=None,
              source_size=None, depth_tolerance=DEPTH_TOLERANCE, ops=None):
    """Warp from two image-space meshes of one topology.

    Args:
        source_vertices: (B|1, V, 3) the source face's mesh in source-image pixels (z nearer = larger).
        driving_vertices: (B, V, 3) the identity-matched driving mesh in output pixels.
        faces: (F, 3) triangles; hole_faces: optional (F,) bool, faces that are the mouth interior.
        size: output side (or (H, W)); source_size: the source image's (H, W), default its image's
            or ``size``.
        source_image: optional (B|1, C, H_s, W_s) float image to warp.
    Returns:
        a :class:`Warp`.
    """
    ops = _ops() if ops is None else ops
    height, width = (size, size) if isinstance(size, int) else size
    if source_size is None:
        source_size = tuple(source_image.shape[-2:]) if source_image is not None else (height, width)
    elif isinstance(source_size, int):
        source_size = (source_size, source_size)
    batch = driving_vertices.shape[0]
    source_vertices = source_vertices.contiguous()
    driving_vertices = driving_vertices.contiguous()
    faces = faces.to(driving_vertices.device)

    face_index, bary, _ = ops.rasterize(driving_vertices, faces, height, width)
    covered = face_index >= 0
    source_xyz = ops.interpolate(source_vertices, faces, face_index, bary)  # (B, H, W, 3)
    # One source z-buffer serves every driving frame of a batch-1 source.
    pixels = pixel_grid(height, width, driving_vertices)
    coverage = covered[:, None].to(driving_vertices.dtype)
    displacement = (source_xyz[..., :2] - pixels).permute(0, 3, 1, 2) * coverage
    source_xy = pixels + extend_displacement(displacement, coverage).permute(0, 2, 3, 1)

    # Hidden in the source view: behind every surface of the source z-buffer near the source pixel.
    src_index, _, src_depth = ops.rasterize(source_vertices, faces, *source_size)
    src_depth = src_depth.masked_fill(src_index < 0, float("inf"))
    nearest_front = _minimum_3x3(src_depth)
    # (the mesh's exact source position, not the border-blended one used for sampling)
    depth_range = source_vertices[..., 2].amax(1) - source_vertices[..., 2].amin(1)
    tolerance = (depth_tolerance * depth_range).clamp_min(MIN_DEPTH_TOLERANCE_PX)[:, None, None]
    front = _gather_pixels(nearest_front, source_xyz[..., 0], source_xyz[..., 1], batch)
    hidden = covered & (source_xyz[..., 2] < front - tolerance)
    mouth = torch.zeros_like(covered)
    mouth_stretch = torch.ones(batch, dtype=coverage.dtype, device=coverage.device)
    if hole_faces is not None:
        mouth = _per_face(hole_faces, face_index)
        source_mouth = _per_face(hole_faces, src_index).flatten(1).sum(1)
        mouth_stretch = mouth.flatten(1).sum(1).to(coverage.dtype) / source_mouth.clamp_min(1).to(coverage.dtype)
    holes = (hidden | mouth)[:, None].to(coverage.dtype)
    grid = to_sampling_grid(source_xy, *source_size)
    image = None
    if source_image is not None:
        source_image = source_image.to(grid.dtype).expand(batch, -1, -1, -1)
        image = F.grid_sample(source_image, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return Warp(grid=grid, source_xy=source_xy, coverage=coverage, holes=holes,
                mouth=mouth[:, None].to(coverage.dtype), mouth_stretch=mouth_stretch, image=image)


def geometric_reenact(model, source_image, alpha_src, beta_src, pose_src, beta_drv, pose_drv, pose_ref=None,
                      mode="relative", size=None, ops=None):
    """Reenact a source image by driving parameters, with no learned model.

    Args:
        model: the MorphableModel both fits used.
        source_image: (1|B, C, H, W) float image (any range); None to get the grid and masks only.
        alpha_src, beta_src, pose_src: the source fit (pose in source-image pixels).
        beta_drv, pose_drv: driving expression (B, Ke) and pose (B, 3, 4).
        pose_ref, mode: as in :func:`reenact.face3d.pncc.reconstruct_vertices` (``"relative"``
            moves the source head by the driving pose change since ``pose_ref``; default reference:
            the first driving pose).
        size: output side, default the source image's.
    Returns:
        a :class:`Warp` (``image`` is the warped source; ``holes`` and ``mouth`` mark what it
        cannot show).
    """
    if size is None:
        if source_image is None:
            raise ValueError("geometric_reenact needs size when no source_image is given")
        size = tuple(source_image.shape[-2:])
    pose_drv = pose_drv if pose_drv.ndim == 3 else pose_drv[None]
    if mode == "relative" and pose_ref is None:
        pose_ref = pose_drv[:1]
    source_vertices = model.image_vertices(alpha_src, beta_src, pose_src)
    driving_vertices = reconstruct_vertices(model, alpha_src, beta_drv, pose_drv, pose_src, pose_ref, mode)
    source_size = tuple(source_image.shape[-2:]) if source_image is not None else size
    return mesh_warp(source_vertices, driving_vertices, model.faces, size, source_image,
                     getattr(model, "hole_faces", None), source_size, ops=ops)


def shade_mouth(warp, darkness=0.85):
    """The warped image with the mouth interior darkened by how much more of it the output shows
    than the source (a mouth opened wider than the source's shows a dark inside, roughly; a mouth
    as open as the source's keeps the source's teeth)."""
    amount = darkness * (1.0 - 1.0 / warp.mouth_stretch.clamp_min(1.0))
    return warp.image * (1.0 - amount[:, None, None, None] * warp.mouth)


__all__ = ["Warp", "mesh_warp", "geometric_reenact", "extend_displacement", "pixel_grid",
           "to_sampling_grid", "shade_mouth", "DEPTH_TOLERANCE"]
