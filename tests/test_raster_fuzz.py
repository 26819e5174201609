"""Hypothesis fuzzing of the rasterizer entry points (RELIABILITY item 10): random shapes, dtypes,
strides and values (NaN, Inf, huge, ties, bad indices). Only ValueError or TypeError may come
out, and successful calls return correctly shaped, finite outputs."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pncc_cuda

COORDINATES = st.one_of(
    st.floats(-4.0, 20.0, width=32),
    st.sampled_from([0.0, 0.5, 1.0, 3.0, -0.0, 1e10, -1e10, math.inf, -math.inf, math.nan]),
)
INDICES = st.one_of(st.integers(-2, 14), st.sampled_from([2**31 - 1, 2**31 + 5, -(2**40)]))


@st.composite
def raster_inputs(draw):
    batch = draw(st.integers(0, 3))
    num_vertices = draw(st.integers(0, 12))
    num_faces = draw(st.integers(0, 8))
    height, width = draw(st.integers(0, 12)), draw(st.integers(0, 12))
    vertex_dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int32]))
    face_dtype = draw(st.sampled_from([torch.int32, torch.int64, torch.float32]))
    coords = draw(st.lists(COORDINATES, min_size=batch * num_vertices * 3, max_size=batch * num_vertices * 3))
    index_values = draw(st.lists(INDICES, min_size=num_faces * 3, max_size=num_faces * 3))
    vertices = torch.tensor(coords, dtype=torch.float64).reshape(batch, num_vertices, 3)
    vertices = vertices.nan_to_num(posinf=2**31, neginf=-(2**31)).to(vertex_dtype) if not vertex_dtype.is_floating_point else vertices.to(vertex_dtype)
    faces = torch.tensor(index_values, dtype=torch.int64).reshape(num_faces, 3)
    if face_dtype == torch.int32:
        faces = faces.clamp(-(2**31), 2**31 - 1)
    faces = faces.to(face_dtype)
    if draw(st.booleans()):  # a non-contiguous view with the same values
        vertices = vertices.transpose(1, 2).contiguous().transpose(1, 2)
    shape_bug = draw(st.sampled_from([None, "vertices_rank", "faces_cols"]))
    if shape_bug == "vertices_rank":
        vertices = vertices.reshape(-1)
    elif shape_bug == "faces_cols" and num_faces:
        faces = faces[:, :2]
    return vertices, faces, height, width


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raster_inputs())
def test_rasterize_and_render_pncc_raise_only_documented_errors(inputs):
    vertices, faces, height, width = inputs
    try:
        face_index, bary, depth = pncc_cuda.rasterize(vertices, faces, height, width)
    except (ValueError, TypeError):
        return
    batch = vertices.shape[0]
    assert face_index.shape == (batch, height, width) and bary.shape == (batch, height, width, 3)
    assert torch.isfinite(bary).all() and torch.isfinite(depth).all()
    assert ((face_index >= -1) & (face_index < max(faces.shape[0], 1))).all()
    ncc = torch.rand(vertices.shape[1], 3, dtype=vertices.dtype)
    pncc, mask = pncc_cuda.render_pncc(vertices, faces, ncc, height, width)
    assert torch.equal(mask[:, 0] > 0, face_index >= 0)
    out = pncc_cuda.interpolate(ncc.unsqueeze(0), faces, face_index, bary)
    assert torch.equal(out.permute(0, 3, 1, 2), pncc)


@settings(max_examples=200, deadline=None)
@given(
    face_values=st.lists(st.integers(-3, 3), min_size=1, max_size=16),
    num_faces=st.integers(0, 3),
    attr_batch=st.sampled_from([1, 2, 3]),
)
def test_interpolate_rejects_bad_face_index_without_reading_out_of_bounds(face_values, num_faces, attr_batch):
    pixels = len(face_values)
    face_index = torch.tensor(face_values, dtype=torch.int32).reshape(2, 1, -1) if pixels % 2 == 0 else torch.tensor(face_values, dtype=torch.int32).reshape(1, 1, -1)
    batch = face_index.shape[0]
    faces = torch.arange(num_faces * 3, dtype=torch.int32).reshape(num_faces, 3)
    attributes = torch.rand(attr_batch, max(num_faces * 3, 1), 2)
    bary = torch.rand(*face_index.shape, 3)
    try:
        out = pncc_cuda.interpolate(attributes, faces, face_index, bary)
    except (ValueError, TypeError):
        assert not ((face_index >= -1) & (face_index < num_faces)).all() or attr_batch not in (1, batch)
        return
    assert out.shape == (*face_index.shape, 2)
