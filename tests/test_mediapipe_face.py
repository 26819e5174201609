"""The built-in real face model (load_model("mediapipe")): topology, fit, identity-matched transfer."""
import numpy as np
import pytest
import torch

pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 is not installed (optional extra)")

from reenact.face3d import load_model  # noqa: E402
from reenact.face3d import mediapipe_face as mf  # noqa: E402
from reenact.face3d.expressions import LOWER_LIP, expression_offsets, script_parameters  # noqa: E402
from reenact.face3d.fit import fit_landmarks  # noqa: E402
from reenact.face3d.pncc import reconstruct_vertices  # noqa: E402

UPPER_INNER_LIP, LOWER_INNER_LIP = 13, 14  # the inner lip midpoints


@pytest.fixture(scope="module")
def model():
    return load_model("mediapipe")


@pytest.fixture(scope="module")
def portraits():
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the astronaut photo")
    cbook = pytest.importorskip("matplotlib.cbook", reason="matplotlib provides grace_hopper.jpg")
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        hopper = np.asarray(Image.open(handle).convert("RGB"))
    return {"astronaut": data.astronaut(), "hopper": hopper}


@pytest.fixture(scope="module")
def dense(portraits):
    from reenact.face3d.detectors import MediapipeDetector

    with MediapipeDetector() as detector:
        return {name: detector.detect_dense(image) for name, image in portraits.items()}


def test_topology_is_the_tessellation_with_capped_openings(model):
    skin = mf.tessellation_faces()
    assert len(skin) == 852  # Euler: V - E + F = 2 - 4 boundaries, E = 1322
    loops = mf.boundary_loops(model.faces.numpy())
    assert len(loops) == 1 and len(loops[0]) == 36  # only the face outline stays open
    mouth = model.faces[model.hole_faces]
    assert set(mouth.flatten().tolist()) <= set(model.regions["lips"])
    assert len(mouth) == 18  # a 20-vertex inner-lip loop
    corners = model.mean[model.faces]
    normal_z = torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1)[:, 2]
    assert (normal_z > 0).all()  # all faces wound towards the viewer


def test_mean_shape_is_a_symmetric_face(model):
    mean = model.mean
    mirrored = mean[model.mirror] * torch.tensor([-1.0, 1.0, 1.0])
    pairs = model.mirror[model.mirror] == torch.arange(mf.NUM_VERTICES)
    assert pairs.float().mean() > 0.9
    assert (mean - mirrored)[pairs].abs().max() < 1e-3
    eye_span = (mean[33] - mean[263]).norm()
    assert abs(eye_span - 90.0) < 1e-3
    assert mean[1, 2] > mean[33, 2] + 15  # the nose tip is in front of the eye corners


def test_fitting_a_photo_twice_gives_the_same_identity(model, portraits):
    from reenact.face3d.detectors import MediapipeDetector

    fits = []
    for _ in range(2):
        with MediapipeDetector() as detector:
            fits.append(model.fit_dense(detector.detect_dense(portraits["astronaut"])[None]))
    assert torch.allclose(fits[0].clip_alpha, fits[1].clip_alpha, atol=1e-4)
    assert fits[0].ok.all()
    # ...and two different people have clearly different identities.
    with MediapipeDetector() as detector:
        other = model.fit_dense(detector.detect_dense(portraits["hopper"])[None])
    assert (other.clip_alpha - fits[0].clip_alpha).norm() > 100 * (fits[1].clip_alpha - fits[0].clip_alpha).norm() + 1.0


def test_fit_reproduces_the_observed_mesh(model, dense):
    points = np.stack([dense["astronaut"], dense["astronaut"] * [1.0, 1.0, 1.0] + [3.0, -2.0, 0.0]])
    fit = model.fit_dense(points)
    vertices = model.image_vertices(fit.alpha, fit.beta, fit.pose)
    assert (vertices[..., :2] - torch.from_numpy(points[:, :468, :2]).float()).abs().max() < 1e-2
    assert fit.rms_px.max() < 1e-2
    assert torch.allclose(fit.alpha[0], fit.alpha[1])  # one clip, one identity


def test_reconstruction_with_the_sources_own_expression_is_the_source_mesh(model, dense):
    """Identity per clip, expression per frame: each frame, rebuilt from the clip identity and its
    own expression, is its own mesh again; another frame's expression changes it."""
    clip = np.stack([dense["astronaut"], dense["astronaut"]])
    clip[1, mf.NUM_VERTICES // 2:, 1] += 4.0  # a second frame with a deformation
    fit = model.fit_dense(clip)
    own = reconstruct_vertices(model, fit.alpha[:1], fit.beta[:1], fit.pose[:1])
    observed = torch.from_numpy(clip[0, :468, :2]).float()
    assert (own[0, :, :2] - observed).abs().max() < 1e-2
    other = reconstruct_vertices(model, fit.alpha[:1], fit.beta[1:], fit.pose[:1])
    assert (other[0, :, :2] - observed).abs().max() > 2.0


def test_an_open_mouth_transfers_to_another_identity(model, dense):
    """Hopper's identity with the astronaut clip's open-mouth expression opens Hopper's mouth in
    P_d', by the driving opening scaled to Hopper's face."""
    astronaut = model.fit_dense(dense["astronaut"][None])
    hopper = model.fit_dense(dense["hopper"][None])
    opening = torch.from_numpy(expression_offsets(model)["open_mouth"]).reshape(1, -1)
    # A two-frame driving clip: the astronaut as photographed, then with the mouth opened.
    drive = np.stack([dense["astronaut"], dense["astronaut"]])
    driven = model.vertices(astronaut.alpha, opening)[0]
    drive[1, :468] = (driven @ astronaut.pose[0, :, :3].T + astronaut.pose[0, :, 3]).numpy() * [1, 1, -1]
    fit = model.fit_dense(drive)

    def gap(vertices):  # signed: a closed-mouth identity minus half an opening crosses its lips
        return vertices[..., UPPER_INNER_LIP, 1] - vertices[..., LOWER_INNER_LIP, 1]

    closed = reconstruct_vertices(model, hopper.alpha, fit.beta[:1], hopper.pose)
    opened = reconstruct_vertices(model, hopper.alpha, fit.beta[1:], hopper.pose)
    source_scale = hopper.scale.item()
    growth = -(gap(opened) - gap(closed)).item() / source_scale  # image y points down; millimetres
    expected = (gap(model.vertices(astronaut.alpha, opening)) - gap(model.vertices(astronaut.alpha))).item()
    assert expected > 5.0
    assert abs(growth - expected) < 0.1 * expected, (growth, expected)
    # The rest of Hopper's face keeps her identity: the forehead does not move.
    forehead = model.rigid_weights > 0
    assert (opened[0, forehead] - closed[0, forehead]).abs().max() < 0.05 * growth * source_scale


def test_scripted_expressions_move_their_regions(model, dense):
    fit = model.fit_dense(dense["astronaut"][None])
    offsets = expression_offsets(model)
    assert (offsets["open_mouth"][list(LOWER_LIP), 1] < -3.0).all()  # the lower lip goes down
    assert np.abs(offsets["open_mouth"][model.rigid_weights.numpy() > 0]).max() < 0.5
    brows = model.regions["right_brow"] + model.regions["left_brow"]
    assert (offsets["raise_brows"][brows, 1] > 3.0).all()
    for side in ("right", "left"):
        upper, lower = model.regions[f"{side}_upper_lid"], model.regions[f"{side}_lower_lid"]
        closed = model.mean.numpy()[upper, 1] + offsets["blink"][upper, 1]
        assert closed.min() - model.mean.numpy()[lower, 1].min() < 0.3 * (
            model.mean.numpy()[upper, 1].max() - model.mean.numpy()[lower, 1].min())
    drive = script_parameters(model, fit.beta[0], fit.pose[0])
    frames = len(drive["labels"])
    assert drive["beta"].shape == (frames, model.num_exp) and drive["pose"].shape == (frames, 3, 4)
    assert torch.allclose(drive["beta"][0], fit.beta[0]) and torch.allclose(drive["pose"][0], fit.pose[0], atol=1e-4)


def test_the_landmark_fitter_refuses_the_dense_model_with_a_clear_error(model):
    with pytest.raises(ValueError, match="dense face mesh"):
        fit_landmarks(model, torch.zeros(1, 68, 2))


def test_fit_dense_rejects_bad_points(model):
    with pytest.raises(ValueError, match="face-mesh points"):
        model.fit_dense(np.zeros((1, 10, 3)))
    with pytest.raises(ValueError, match="finite"):
        model.fit_dense(np.full((1, 478, 3), np.nan))


def test_reenact_pncc_takes_the_builtin_model(tmp_path, portraits):
    pytest.importorskip("pncc_cuda", reason="pncc_cuda's extension is not built")
    from PIL import Image

    from reenact import cli

    photo = tmp_path / "astronaut.png"
    Image.fromarray(portraits["astronaut"]).save(photo)
    assert cli.main(["pncc", str(photo), "--out", str(tmp_path / "out"), "--model", "mediapipe"]) == 0
    params = np.load(tmp_path / "out" / "astronaut_params.npz")
    assert params["alpha"].shape == (1, 1404) and str(params["model_name"]).startswith("mediapipe")
    pncc = np.asarray(Image.open(tmp_path / "out" / "astronaut_pncc.png"))
    assert (pncc.max(-1) > 0).mean() > 0.02  # the face is rendered
