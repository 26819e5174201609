"""Input preconditions of the rasterizer ops (rasterize, interpolate, render_pncc and their
backwards), for the fake (meta) kernels.

They state the shape, dtype and device checks of csrc/raster/raster_check.cpp with word-for-word
the same messages, so that a traced program (torch.compile, meta tensors) fails the way an eager
one does. Value checks (index ranges) need data and live in C++ only.
"""
import torch

from ._messages import check_same_device as _same_device, shape_str as _shape

MAX_IMAGE_SIDE = 32768  # kMaxImageSide in raster_check.h
_FLOAT = (torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)


def check_faces(faces, like, like_name):
    if faces.dtype not in _INDEX:
        raise TypeError(f"faces must be an int32 or int64 tensor, got {faces.dtype}")
    if faces.dim() != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {_shape(faces)}")
    _same_device("faces", faces, like, like_name)
    if faces.shape[0] > 2**31 - 1:
        raise ValueError(f"faces must have at most 2147483647 rows, got {faces.shape[0]}")


def check_mesh(vertices, faces, height, width):
    if vertices.dtype not in _FLOAT:
        raise TypeError(f"vertices must be a float32 or float64 tensor, got {vertices.dtype}")
    if vertices.dim() != 3 or vertices.shape[2] != 3:
        raise ValueError(f"vertices must have shape (B, V, 3), got {_shape(vertices)}")
    for name, size in (("height", height), ("width", width)):
        if not 0 <= size <= MAX_IMAGE_SIDE:
            raise ValueError(f"{name} must be in [0, {MAX_IMAGE_SIDE}], got {size}")
    check_faces(faces, vertices, "vertices")


def check_ncc(ncc, vertices):
    if ncc.dtype != vertices.dtype:
        raise TypeError(f"ncc must have dtype {vertices.dtype} like vertices, got {ncc.dtype}")
    batch, num_vertices = vertices.shape[0], vertices.shape[1]
    shape_ok = (ncc.dim() == 2 or (ncc.dim() == 3 and ncc.shape[0] == batch)) and tuple(
        ncc.shape[-2:]
    ) == (num_vertices, 3)
    if not shape_ok:
        raise ValueError(
            f"ncc must have shape (V, 3) or (B, V, 3) with B={batch} and V={num_vertices}, "
            f"got {_shape(ncc)}"
        )
    _same_device("ncc", ncc, vertices, "vertices")


def check_raster_outputs(face_index, bary, like, like_name):
    if face_index.dtype != torch.int32:
        raise TypeError(f"face_index must be an int32 tensor, got {face_index.dtype}")
    if face_index.dim() != 3:
        raise ValueError(f"face_index must have shape (B, H, W), got {_shape(face_index)}")
    if bary.dtype != like.dtype:
        raise TypeError(f"bary must have dtype {like.dtype} like {like_name}, got {bary.dtype}")
    if bary.dim() != 4 or bary.shape[3] != 3 or bary.shape[:3] != face_index.shape:
        raise ValueError(
            f"bary must have shape (B, H, W, 3) matching face_index {_shape(face_index)}, "
            f"got {_shape(bary)}"
        )
    if like.shape[0] not in (1, face_index.shape[0]):
        raise ValueError(
            f"{like_name} must have batch size 1 or B={face_index.shape[0]} like face_index, "
            f"got {_shape(like)}"
        )
    _same_device("face_index", face_index, like, like_name)
    _same_device("bary", bary, like, like_name)


def check_interpolate(attributes, faces, face_index, bary):
    if attributes.dtype not in _FLOAT:
        raise TypeError(f"attributes must be a float32 or float64 tensor, got {attributes.dtype}")
    if attributes.dim() != 3:
        raise ValueError(
            f"attributes must have shape (B, V, C) or (1, V, C), got {_shape(attributes)}"
        )
    check_faces(faces, attributes, "attributes")
    check_raster_outputs(face_index, bary, attributes, "attributes")


def check_rasterize_backward(grad_bary, grad_depth, vertices, faces, face_index, bary):
    if face_index.dim() != 3:
        raise ValueError(f"face_index must have shape (B, H, W), got {_shape(face_index)}")
    check_mesh(vertices, faces, face_index.shape[1], face_index.shape[2])
    check_raster_outputs(face_index, bary, vertices, "vertices")
    if vertices.shape[0] != face_index.shape[0]:
        raise ValueError(
            f"vertices must have batch size B={face_index.shape[0]} like face_index, "
            f"got {_shape(vertices)}"
        )
    if grad_bary.shape != bary.shape:
        raise ValueError(
            f"grad_bary must have the shape of bary {_shape(bary)}, got {_shape(grad_bary)}"
        )
    if grad_depth.shape != face_index.shape:
        raise ValueError(
            f"grad_depth must have the shape of depth {_shape(face_index)}, "
            f"got {_shape(grad_depth)}"
        )
    _same_device("grad_bary", grad_bary, vertices, "vertices")
    _same_device("grad_depth", grad_depth, vertices, "vertices")


def check_interpolate_backward(grad_out, attributes, faces, face_index, bary):
    check_interpolate(attributes, faces, face_index, bary)
    expected = (*face_index.shape, attributes.shape[2])
    if tuple(grad_out.shape) != expected:
        raise ValueError(
            f"grad_out must have shape (B, H, W, C) = {expected}, got {_shape(grad_out)}"
        )
    _same_device("grad_out", grad_out, attributes, "attributes")
