"""Geometric reenactment (reenact.warp): identity map, analytic rigid motion, occlusion holes."""
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pncc_cuda", reason="pncc_cuda's extension is not built")

import pncc_cuda  # noqa: E402
from reenact.face3d import load_model  # noqa: E402
from reenact.face3d.pose import compose_pose, euler_to_matrix  # noqa: E402
from reenact.warp import FILL_STRIDE, _minimum_3x3, geometric_reenact, mesh_warp, pixel_grid, shade_mouth  # noqa: E402

SIZE = 128


@pytest.fixture(scope="module")
def toy():
    return load_model("toy")


def _pose(model, yaw=0.0, pitch=0.0, roll=0.0, scale=None, shift=(0.0, 0.0)):
    span = (model.mean.max(0).values - model.mean.min(0).values)[:2].max().item()
    scale = scale if scale is not None else 0.6 * SIZE / span
    rotation = euler_to_matrix(yaw, pitch, roll).float()
    translation = torch.tensor([SIZE / 2 + shift[0], SIZE / 2 + shift[1], 0.0])
    return compose_pose(rotation[None], torch.tensor([scale]), translation[None])


def _eroded(mask, pixels):
    return -F.max_pool2d(-mask, 2 * pixels + 1, stride=1, padding=pixels)


def _image(batch=1):
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, SIZE, SIZE, generator=generator)


def test_identical_parameters_give_the_identity_map(toy):
    alpha = torch.randn(1, toy.num_id, generator=torch.Generator().manual_seed(1)) * 0.5
    beta = torch.zeros(1, toy.num_exp)
    pose = _pose(toy, yaw=10.0)
    source = _image()
    warp = geometric_reenact(toy, source, alpha, beta, pose, beta, pose, mode="absolute")
    assert warp.coverage.sum() > 0.2 * SIZE * SIZE
    error = (warp.source_xy - pixel_grid(SIZE, SIZE, warp.source_xy)).norm(dim=-1)
    assert error.max() < 1e-3  # the whole field, inside and outside the face
    assert warp.holes.sum() == 0
    assert torch.allclose(warp.image, source, atol=1e-4)


def test_a_known_rigid_motion_gives_the_analytic_grid(toy):
    """An in-plane rotation, scale and shift of the head maps every driving pixel to the source
    by the inverse 2-D similarity, whatever the depth."""
    alpha = torch.zeros(1, toy.num_id)
    pose_src = _pose(toy, yaw=15.0)
    roll, factor, shift = 12.0, 1.15, torch.tensor([6.0, -4.0])
    angle = math.radians(roll)
    # Image-plane motion about the image centre: x' = c + factor * Q (x - c) + shift.
    q = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    motion = torch.eye(3)
    motion[:2, :2] = factor * q
    motion[2, 2] = factor
    centre = torch.tensor([SIZE / 2, SIZE / 2, 0.0])
    pose_drv = pose_src.clone()
    pose_drv[0, :, :3] = motion @ pose_src[0, :, :3]
    pose_drv[0, :, 3] = motion @ (pose_src[0, :, 3] - centre) + centre + torch.cat([shift, torch.zeros(1)])
    beta = torch.zeros(1, toy.num_exp)
    warp = geometric_reenact(toy, None, alpha, beta, pose_src, beta, pose_drv, mode="absolute", size=SIZE)
    pixels = pixel_grid(SIZE, SIZE, warp.source_xy)
    expected = ((pixels - centre[:2] - shift) @ torch.linalg.inv(factor * q).T) + centre[:2]
    inside = _eroded(warp.coverage, 2 * FILL_STRIDE + 1)[0, 0] > 0  # away from the blended border band
    assert inside.sum() > 0.1 * SIZE * SIZE
    error = (warp.source_xy[0] - expected).norm(dim=-1)[inside]
    assert error.max() < 0.02, f"largest grid error {error.max():.4f} px"


def test_regions_hidden_in_the_source_are_holes(toy):
    """A source turned 60 degrees hides its far cheek; a frontal driving face shows it: holes there
    and only there."""
    alpha = torch.zeros(1, toy.num_id)
    beta = torch.zeros(1, toy.num_exp)
    pose_src, pose_drv = _pose(toy, yaw=60.0), _pose(toy, yaw=0.0)
    warp = geometric_reenact(toy, None, alpha, beta, pose_src, beta, pose_drv, mode="absolute", size=SIZE)
    holes, covered = warp.holes[0, 0] > 0, warp.coverage[0, 0] > 0
    columns = torch.arange(SIZE).float()[None].expand(SIZE, -1)
    centre_x = (columns * covered).sum() / covered.sum()
    left, right = covered & (columns < centre_x), covered & (columns >= centre_x)
    hole_share = [(holes & side).sum().item() / side.sum().item() for side in (left, right)]
    assert max(hole_share) > 0.15, hole_share
    assert min(hole_share) < 0.02, hole_share
    # A frontal source hides nothing of the same frontal face.
    same = geometric_reenact(toy, None, alpha, beta, pose_drv, beta, pose_drv, mode="absolute", size=SIZE)
    assert same.holes.sum() == 0


def test_mesh_warp_batches_and_moves_the_image(toy):
    alpha = torch.zeros(1, toy.num_id)
    beta = torch.zeros(2, toy.num_exp)
    pose_src = _pose(toy)
    pose_drv = torch.cat([_pose(toy), _pose(toy, shift=(10.0, 0.0))])
    source = _image()
    warp = geometric_reenact(toy, source, alpha, beta[:1], pose_src, beta, pose_drv, mode="absolute")
    assert warp.image.shape == (2, 3, SIZE, SIZE)
    assert torch.allclose(warp.image[0], source[0], atol=1e-4)
    inside = _eroded(warp.coverage[1:], 2 * FILL_STRIDE + 1)[0, 0] > 0
    moved = torch.roll(source[0], 10, dims=-1)
    assert (warp.image[1] - moved).abs().amax(0)[inside].max() < 1e-3
    shaded = shade_mouth(warp)
    assert torch.equal(shaded, warp.image)  # the toy head has no mouth interior


def test_mesh_warp_reports_the_mouth_interior(toy):
    faces = toy.faces
    hole_faces = torch.zeros(len(faces), dtype=torch.bool)
    hole_faces[: len(faces) // 4] = True
    vertices = toy.image_vertices(torch.zeros(1, toy.num_id), None, _pose(toy))
    warp = mesh_warp(vertices, vertices, faces, SIZE, hole_faces=hole_faces)
    assert warp.mouth.sum() > 0
    assert torch.equal(warp.holes, warp.mouth)  # nothing hidden, so every hole is mouth
    assert torch.allclose(warp.mouth_stretch, torch.ones(1))
    # Exactly the pixels whose front face is a hole face; a driving face 1.2x larger shows 1.44x the area.
    face_index = pncc_cuda.rasterize(vertices, faces, SIZE, SIZE)[0]
    assert torch.equal(warp.mouth[:, 0] > 0, (face_index >= 0) & hole_faces[face_index.long().clamp_min(0)])
    centre = torch.tensor([SIZE / 2, SIZE / 2, 0.0])
    larger = mesh_warp(vertices, (vertices - centre) * 1.2 + centre, faces, SIZE, hole_faces=hole_faces)
    assert abs(larger.mouth_stretch.item() - 1.44) < 0.05


def test_the_visibility_test_reads_the_nearest_depth_around_each_source_pixel():
    """The source z-buffer's minimum over each pixel's 3x3 neighbourhood (+inf outside the image)."""
    depth = torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(0))
    depth[0, 4, 5] = float("inf")  # background
    expected = -F.max_pool2d(-depth[:, None], 3, stride=1, padding=1)[:, 0]
    assert torch.equal(_minimum_3x3(depth), expected)
