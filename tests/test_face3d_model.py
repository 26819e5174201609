"""Morphable models, the toy head, the .npz format and pose algebra."""
import numpy as np
import pytest
import torch

from face3d_support import model_by_name, sfm_model, toy_model
from reenact.face3d.loading import load_model
from reenact.face3d.morphable import MorphableModel, load_npz_model, save_npz_model
from reenact.face3d.pose import (
    axis_angle_to_matrix, compose_pose, decompose_pose, euler_to_matrix, matrix_to_axis_angle,
    relative_pose, rotation_angle_between,
)


def test_toy_head_is_a_labelled_synthetic_morphable_head():
    model = toy_model()
    assert 2000 <= model.num_vertices <= 8000
    assert "synthetic" in model.name and model.synthetic
    assert {"jaw_open", "smile", "brow_raise", "blink"} <= set(model.exp_names)
    assert model.landmarks68.min() >= 0 and len(set(model.landmarks68.tolist())) == 68
    assert model.colors.shape == (model.num_vertices, 3)
    assert 0 <= model.colors.min() and model.colors.max() <= 1
    assert torch.allclose(model.ncc.amin(0), torch.zeros(3)) and torch.allclose(model.ncc.amax(0), torch.ones(3))


def test_toy_expressions_do_what_their_names_say():
    model = toy_model()
    names = list(model.exp_names)
    neutral = model.vertices(torch.zeros(model.num_id))[0]
    lm = model.landmarks68

    def moved(name):
        beta = torch.zeros(model.num_exp)
        beta[names.index(name)] = 1.0
        return model.vertices(torch.zeros(model.num_id), beta)[0] - neutral

    jaw = moved("jaw_open")
    assert jaw[lm[57], 1] < -10 and jaw[lm[51], 1].abs() < 1  # lower lip down, upper lip stays
    smile = moved("smile")
    assert smile[lm[48], 1] > 3 and smile[lm[54], 1] > 3  # mouth corners up
    assert moved("brow_raise")[lm[19], 1] > 3
    blink = moved("blink")
    assert blink[lm[37], 1] < -5 and blink[lm[41], 1].abs() < 2  # upper lid down, lower lid stays


@pytest.mark.parametrize("name", ["toy", "sfm"])
def test_vertices_are_linear_in_the_coefficients(name):
    model = model_by_name(name)
    generator = torch.Generator().manual_seed(0)
    alpha = torch.randn(3, model.num_id, generator=generator)
    beta = torch.randn(3, model.num_exp, generator=generator)
    vertices = model.vertices(alpha, beta)
    assert vertices.shape == (3, model.num_vertices, 3)
    expected = model.mean + torch.einsum("vck,bk->bvc", model.id_basis.double(), alpha.double()) \
        + torch.einsum("vck,bk->bvc", model.exp_basis.double(), beta.double())
    torch.testing.assert_close(vertices.double(), expected, atol=1e-3, rtol=1e-5)
    # (Ki,) broadcasts against (B, Ke)
    assert model.vertices(alpha[0], beta).shape == (3, model.num_vertices, 3)


def test_wrong_shaped_parameters_raise_value_errors_naming_the_argument():
    model = toy_model()
    with pytest.raises(ValueError, match="alpha"):
        model.vertices(torch.zeros(model.num_id + 1))
    with pytest.raises(ValueError, match="beta"):
        model.vertices(torch.zeros(model.num_id), torch.zeros(2, 3, model.num_exp))
    with pytest.raises(ValueError, match="pose"):
        model.image_vertices(torch.zeros(model.num_id), None, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="alpha"):
        model.vertices(torch.full((model.num_id,), float("nan")))
    with pytest.raises(TypeError, match="alpha"):
        model.vertices("not numbers")


def test_npz_roundtrip_keeps_everything(tmp_path):
    model = toy_model()
    path = tmp_path / "toy model ü.npz"
    save_npz_model(model, path)
    loaded = load_model(path)
    assert loaded.name == model.name and loaded.synthetic
    for key in ("mean", "id_basis", "exp_basis", "faces", "landmarks68", "colors", "ncc"):
        torch.testing.assert_close(getattr(loaded, key), getattr(model, key))
    assert loaded.exp_names == model.exp_names


def test_npz_loader_reports_missing_keys_and_files(tmp_path):
    np.savez(tmp_path / "partial.npz", mean=np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="lacks the keys"):
        load_npz_model(tmp_path / "partial.npz")
    with pytest.raises(FileNotFoundError):
        load_npz_model(tmp_path / "absent.npz")
    (tmp_path / "garbage.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_npz_model(tmp_path / "garbage.npz")


def test_sfm_model_loads_with_contours():
    model = sfm_model()
    assert model.num_vertices == 3448 and model.num_id == 63 and model.num_exp == 6
    assert model.has_contours and (model.landmarks68[:8] == -1).all()
    # The right contour is the subject's right side: negative model x.
    assert (model.mean[model.contour_right, 0] < 0).all() and (model.mean[model.contour_left, 0] > 0).all()


def test_model_rejects_out_of_range_faces_and_missing_contours():
    mean = np.zeros((5, 3), np.float32)
    basis = np.zeros((5, 3, 1), np.float32)
    landmarks = np.zeros(68, np.int64)
    with pytest.raises(ValueError, match="faces"):
        MorphableModel(mean, basis, basis, np.array([[0, 1, 5]]), landmarks)
    landmarks[0] = -1
    with pytest.raises(ValueError, match="contour"):
        MorphableModel(mean, basis, basis, np.array([[0, 1, 2]]), landmarks)


def test_axis_angle_roundtrip_including_near_pi_and_zero():
    generator = torch.Generator().manual_seed(0)
    axes = torch.nn.functional.normalize(torch.randn(64, 3, generator=generator, dtype=torch.float64), dim=-1)
    angles = torch.cat([torch.tensor([0.0, 1e-9, 1e-4, np.pi - 1e-6, np.pi - 1e-3]), torch.rand(59, generator=generator) * np.pi]).double()
    rotvec = axes * angles[:, None]
    rotation = axis_angle_to_matrix(rotvec)
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(64, 3, 3))
    back = axis_angle_to_matrix(matrix_to_axis_angle(rotation))
    torch.testing.assert_close(back, rotation, atol=1e-7, rtol=0)


def test_pose_compose_decompose_and_y_flip():
    rotation = euler_to_matrix(torch.tensor([10.0, -30.0]), torch.tensor([5.0, 0.0]), torch.tensor([0.0, 20.0]))
    scale = torch.tensor([2.0, 0.5], dtype=torch.float64)
    translation = torch.tensor([[100.0, 120.0, 3.0], [50.0, 60.0, 0.0]], dtype=torch.float64)
    pose = compose_pose(rotation, scale, translation)
    assert (torch.linalg.det(pose[:, :, :3]) < 0).all()  # the y flip is folded in
    r, s, t = decompose_pose(pose)
    torch.testing.assert_close(r, rotation)
    torch.testing.assert_close(s, scale)
    torch.testing.assert_close(t, translation)
    # Model +y (up) goes to image -y (up on screen) for an unrotated pose.
    frontal = compose_pose(torch.eye(3, dtype=torch.float64)[None], torch.ones(1, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64))
    assert frontal[0, 1, 1] == -1 and frontal[0, 2, 2] == 1


def test_relative_pose_applies_the_driving_change_to_the_source():
    rot = euler_to_matrix(torch.tensor([0.0, 20.0, 0.0]), torch.tensor([0.0, 0.0, 10.0]), torch.zeros(3))
    src = compose_pose(euler_to_matrix(15.0, 0.0, 0.0)[None], torch.tensor([1.5], dtype=torch.float64), torch.tensor([[80.0, 90.0, 0.0]], dtype=torch.float64))
    drv = compose_pose(rot, torch.tensor([1.0, 1.2, 1.0], dtype=torch.float64), torch.tensor([[128.0, 128.0, 0], [138.0, 128.0, 0], [128.0, 120.0, 0]], dtype=torch.float64))
    out = relative_pose(drv, drv[:1], src)
    torch.testing.assert_close(out[0], src[0])  # no change -> the source pose
    r_out, s_out, t_out = decompose_pose(out)
    assert rotation_angle_between(r_out[1], decompose_pose(src)[0][0]).item() == pytest.approx(20.0, abs=1e-6)
    assert s_out[1].item() == pytest.approx(1.5 * 1.2)
    assert t_out[1, 0].item() == pytest.approx(80.0 + 10.0 * 1.5)  # translation change scaled by s_src/s_ref
    assert t_out[2, 1].item() == pytest.approx(90.0 - 8.0 * 1.5)
