"""The PNCC z-buffer rasterizer ops: public wrappers, fake kernels and autograd formulas.

Conventions (see DESIGN.md): image-space vertices (B, V, 3) with x right and y down in pixels and
larger z nearer the camera; the pixel at (row i, column j) samples the point (x=j, y=i);
coverage follows the top-left fill rule whatever the winding; the nearest triangle wins and an
exact depth tie goes to the lower face index.
"""
import numbers

import torch

from . import _raster_checks as _checks

__all__ = ["rasterize", "interpolate", "render_pncc"]


def _image_size(height, width):
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(size).__name__}")
    return int(height), int(width)


def rasterize(vertices, faces, height, width):
    """Z-buffer rasterization of a batch of meshes that share one triangle list.

    Args:
        vertices: (B, V, 3) float32/float64, image-space x, y in pixels and depth z.
        faces: (F, 3) int32/int64 vertex indices in [0, V).
        height, width: image size in pixels.

    Returns:
        face_index: (B, H, W) int32, the visible face of each pixel, -1 on the background.
        bary: (B, H, W, 3) screen-space barycentric weights of that face's vertices, 0 on the
            background. Differentiable with respect to `vertices`.
        depth: (B, H, W) interpolated z of the visible surface, 0 on the background.
            Differentiable with respect to `vertices`.
    """
    height, width = _image_size(height, width)
    return tuple(torch.ops.pncc.rasterize.default(vertices, faces, height, width))


def interpolate(attributes, faces, face_index, bary):
    """Interpolates per-vertex attributes over rasterized pixels.

    Args:
        attributes: (B, V, C) or (1, V, C) float32/float64 per-vertex values.
        faces: (F, 3) int32/int64 vertex indices.
        face_index, bary: outputs of `rasterize`.

    Returns:
        (B, H, W, C): sum_i bary[..., i] * attributes[faces[face_index][i]], 0 on the background.
        Differentiable with respect to `attributes` and `bary`.
    """
    return torch.ops.pncc.interpolate.default(attributes, faces, face_index, bary)


def render_pncc(vertices, faces, ncc, height, width):
    """Fused rasterize + interpolate of a per-vertex colour code, written channel-first.

    One z-buffer pass and one resolve pass; the values equal
    `interpolate(ncc, faces, *rasterize(vertices, faces, height, width)[:2])` permuted to
    (B, 3, H, W).

    Args:
        vertices: (B, V, 3) float32/float64 image-space vertices.
        faces: (F, 3) int32/int64 vertex indices.
        ncc: (V, 3) or (B, V, 3) per-vertex code (normally the mean shape min-max normalised to
            [0, 1] per axis), same dtype as `vertices`.
        height, width: image size in pixels.

    Returns:
        pncc: (B, 3, H, W), 0 on the background. Differentiable with respect to `vertices` and
            `ncc`.
        mask: (B, 1, H, W), 1 where a face is visible, else 0. Not differentiable.
    """
    height, width = _image_size(height, width)
    return tuple(torch.ops.pncc.render_pncc.default(vertices, faces, ncc, height, width))


# ---- fake kernels: shapes, dtypes and the same preconditions as the C++ checks ----


@torch.library.register_fake("pncc::rasterize")
def _rasterize_fake(vertices, faces, height, width):
    _checks.check_mesh(vertices, faces, height, width)
    batch = vertices.shape[0]
    return (
        vertices.new_empty((batch, height, width), dtype=torch.int32),
        vertices.new_empty((batch, height, width, 3)),
        vertices.new_empty((batch, height, width)),
    )


@torch.library.register_fake("pncc::_rasterize_backward")
def _rasterize_backward_fake(grad_bary, grad_depth, vertices, faces, face_index, bary):
    _checks.check_rasterize_backward(grad_bary, grad_depth, vertices, faces, face_index, bary)
    return torch.empty_like(vertices)


@torch.library.register_fake("pncc::interpolate")
def _interpolate_fake(attributes, faces, face_index, bary):
    _checks.check_interpolate(attributes, faces, face_index, bary)
    return attributes.new_empty((*face_index.shape, attributes.shape[2]))


@torch.library.register_fake("pncc::_interpolate_backward")
def _interpolate_backward_fake(grad_out, attributes, faces, face_index, bary):
    _checks.check_interpolate_backward(grad_out, attributes, faces, face_index, bary)
    return torch.empty_like(attributes), torch.empty_like(bary)


@torch.library.register_fake("pncc::render_pncc")
def _render_pncc_fake(vertices, faces, ncc, height, width):
    _checks.check_mesh(vertices, faces, height, width)
    _checks.check_ncc(ncc, vertices)
    batch = vertices.shape[0]
    return (
        vertices.new_empty((batch, 3, height, width)),
        vertices.new_empty((batch, 1, height, width)),
    )


# ---- autograd ----


def _rasterize_setup_context(ctx, inputs, output):
    vertices, faces, _, _ = inputs
    face_index, bary, _ = output
    ctx.save_for_backward(vertices, faces, face_index, bary)


def _rasterize_backward(ctx, grad_face_index, grad_bary, grad_depth):
    vertices, faces, face_index, bary = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    if grad_bary is None:
        grad_bary = torch.zeros_like(bary)
    if grad_depth is None:
        grad_depth = torch.zeros_like(face_index, dtype=bary.dtype)
    grad_vertices = torch.ops.pncc._rasterize_backward.default(
        grad_bary, grad_depth, vertices, faces, face_index, bary
    )
    return grad_vertices, None, None, None


def _interpolate_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _interpolate_backward(ctx, grad_out):
    attributes, faces, face_index, bary = ctx.saved_tensors
    grad_attributes, grad_bary = torch.ops.pncc._interpolate_backward.default(
        grad_out, attributes, faces, face_index, bary
    )
    return (
        grad_attributes if ctx.needs_input_grad[0] else None,
        None,
        None,
        grad_bary if ctx.needs_input_grad[3] else None,
    )


def _render_pncc_setup_context(ctx, inputs, output):
    vertices, faces, ncc, height, width = inputs
    ctx.save_for_backward(vertices, faces, ncc)
    ctx.image_size = (height, width)


def _render_pncc_backward(ctx, grad_pncc, grad_mask):
    # The forward keeps no per-pixel state (that is the point of fusing it); the backward
    # re-rasterizes, which costs one more forward pass and no stored (B, H, W, 3) buffers.
    vertices, faces, ncc = ctx.saved_tensors
    need_vertices, need_ncc = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if grad_pncc is None or not (need_vertices or need_ncc):
        return None, None, None, None, None
    face_index, bary, _ = torch.ops.pncc.rasterize.default(vertices, faces, *ctx.image_size)
    attributes = ncc if ncc.dim() == 3 else ncc.unsqueeze(0)
    grad_attributes, grad_bary = torch.ops.pncc._interpolate_backward.default(
        grad_pncc.permute(0, 2, 3, 1), attributes, faces, face_index, bary
    )
    grad_vertices = None
    if need_vertices:
        grad_depth = torch.zeros_like(face_index, dtype=bary.dtype)
        grad_vertices = torch.ops.pncc._rasterize_backward.default(
            grad_bary, grad_depth, vertices, faces, face_index, bary
        )
    grad_ncc = grad_attributes.reshape(ncc.shape) if need_ncc else None
    return grad_vertices, None, grad_ncc, None, None


def _refuse_double_backward(op_name):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"pncc::{op_name} has no derivative: double backward through the rasterizer ops "
            "is not supported"
        )

    return backward


def _save_nothing(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "pncc::rasterize", _rasterize_backward, setup_context=_rasterize_setup_context
)
torch.library.register_autograd(
    "pncc::interpolate", _interpolate_backward, setup_context=_interpolate_setup_context
)
torch.library.register_autograd(
    "pncc::render_pncc", _render_pncc_backward, setup_context=_render_pncc_setup_context
)
for _op in ("_rasterize_backward", "_interpolate_backward"):
    torch.library.register_autograd(
        f"pncc::{_op}", _refuse_double_backward(_op), setup_context=_save_nothing
    )
