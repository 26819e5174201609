"""Fitting real faces: the robust MAP options, the calibration, eos's SFM files, the model registry.

The real-data test reads a few frames of ../shared/data (skipped with the reason when absent).
"""
import importlib.util
import json
import os
import pathlib
import struct

import numpy as np
import pytest
import torch

from face3d_support import sfm_model, toy_model
from reenact.face3d import calibration, eos_sfm, registry
from reenact.face3d.fit import fit_landmarks, inter_ocular_distance
from reenact.face3d.loading import load_model
from reenact.face3d.synthetic import project_landmarks, random_parameters

SHARED = pathlib.Path(os.environ.get("PNCC_SHARED_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))
ARTIFACTS = pathlib.Path(__file__).resolve().parents[1] / "out" / "test-artifacts" / "face3d"


def synthetic_clip(model, frames, seed, offsets=None, noise=0.0):
    generator = torch.Generator().manual_seed(seed)
    alpha, beta, pose = random_parameters(model, frames, generator=generator, share_identity=True, exp_scale=0.5)
    landmarks = project_landmarks(model, alpha, beta, pose).double()
    if offsets is not None:  # a detector whose points sit off the model's vertices
        rows = pose[:, :2, :3].double()
        landmarks = landmarks + torch.einsum("bij,lj->bli", rows, offsets)
    return alpha, pose, landmarks + noise * torch.randn(landmarks.shape, generator=generator, dtype=torch.float64)


# -- the MAP fit ---------------------------------------------------------------------------------

def test_per_frame_identity_prior_does_not_weaken_with_clip_length():
    model = toy_model()
    _, _, landmarks = synthetic_clip(model, 1, seed=1, noise=2.0)
    one = fit_landmarks(model, landmarks, id_prior_per_frame=True, landmark_sigma=0.02)
    copies = fit_landmarks(model, landmarks.expand(40, -1, -1), id_prior_per_frame=True, landmark_sigma=0.02)
    # 40 copies of a frame carry no more information about the identity than the frame itself.
    torch.testing.assert_close(copies.clip_alpha, one.clip_alpha, atol=2e-3, rtol=0)
    per_clip = fit_landmarks(model, landmarks.expand(40, -1, -1), id_prior_per_frame=False, landmark_sigma=0.02)
    assert per_clip.clip_alpha.norm() > 1.2 * one.clip_alpha.norm()  # the plain prior is outweighed


def test_huber_loss_resists_a_wrong_landmark():
    model = toy_model()
    alpha, _, landmarks = synthetic_clip(model, 4, seed=2)
    corrupted = landmarks.clone()
    corrupted[:, 48] += torch.tensor([25.0, -25.0], dtype=torch.float64)  # a mouth corner far off
    options = dict(clip_index=torch.arange(4), id_prior=1e-2, exp_prior=1e-2, landmark_sigma=0.01)
    squared = fit_landmarks(model, corrupted, **options)
    robust = fit_landmarks(model, corrupted, huber=2.0, **options)
    others = [k for k in range(68) if k != 48]
    error = {name: (fit.projected.double() - landmarks)[:, others].norm(dim=-1).mean()
             for name, fit in (("squared", squared), ("robust", robust))}
    assert error["robust"] < 0.5 * error["squared"]
    # and the wrong landmark keeps a large residual instead of being fitted
    assert (robust.residuals[:, 48].norm(dim=-1) > 20).all()


def test_landmark_offsets_explain_a_detectors_systematic_shift():
    model = toy_model()
    offsets = torch.zeros(68, 3, dtype=torch.float64)
    offsets[17:27, 1] = 4.0  # brows detected 4 model units above the model's brow vertices
    offsets[48:60, 0] = torch.linspace(-2, 2, 12, dtype=torch.float64)
    _, _, landmarks = synthetic_clip(model, 12, seed=3, offsets=offsets)
    plain = fit_landmarks(model, landmarks, id_prior=1e-3, exp_prior=1e-3)
    corrected = fit_landmarks(model, landmarks, landmark_offsets=offsets, id_prior=1e-3, exp_prior=1e-3)
    assert corrected.rms_px.max() < 0.05
    assert plain.rms_px.mean() > 10 * corrected.rms_px.mean()


def test_calibration_recovers_offsets_and_sets_a_threshold_above_typical_residuals():
    model = toy_model()
    # A detector whose inner points sit off the model's vertices in a pattern no pose, identity
    # or expression explains (offsets that one of those explains cannot be told apart from it).
    offsets = 2.0 * torch.randn(68, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    offsets[:17], offsets[:, 2] = 0, 0
    data = [synthetic_clip(model, 10, seed=10 + k, offsets=offsets, noise=0.5) for k in range(6)]
    clips = [landmarks for _, _, landmarks in data]
    calib = calibration.calibrate(model, clips, detector="test", rounds=3)
    estimated = torch.as_tensor(calib.landmark_offsets)[17:, :2]
    truth = (offsets - offsets[17:].mean(0))[17:, :2]  # a common shift is the pose's translation
    assert (estimated * truth).sum() / (estimated.norm() * truth.norm()) > 0.85
    assert (estimated - truth).norm(dim=-1).mean() < 0.5 * truth.norm(dim=-1).mean()
    options = calib.fit_options()
    fits = [fit_landmarks(model, c, **options) for c in clips]
    uncorrected = [fit_landmarks(model, c, **dict(options, landmark_offsets=None)) for c in clips]
    identity_error = {name: np.mean([float((f.clip_alpha[0] - alpha[0]).norm()) for f, (alpha, _, _) in zip(group, data)])
                      for name, group in (("calibrated", fits), ("uncorrected", uncorrected))}
    assert identity_error["calibrated"] < 0.95 * identity_error["uncorrected"]
    assert torch.cat([f.ok for f in fits]).float().mean() > 0.95
    rms = torch.cat([f.rms_iod for f in fits])
    assert calib.quality_threshold > rms.median()
    # the calibration survives its JSON form
    again = calibration.Calibration.from_json(calib.to_json())
    np.testing.assert_allclose(again.landmark_offsets, calib.landmark_offsets, atol=1e-4)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(landmark_offsets=[[0, 0, 0]] * 67), "landmark_offsets"),
    (lambda d: d.update(quality_threshold=-1), "quality_threshold"),
    (lambda d: d.update(landmark_sigma="x"), "landmark_sigma"),
    (lambda d: d.pop("model"), "model"),
])
def test_a_broken_calibration_file_is_refused_with_its_name(change, message):
    data = json.loads(calibration.Calibration("m", "d", np.zeros((68, 3)), 0.01, 0.1).to_json())
    change(data)
    with pytest.raises(ValueError, match=message):
        calibration.Calibration.from_json(json.dumps(data), source="broken.json")


def test_shipped_calibration_is_used_for_detected_landmarks_only():
    model = sfm_model()
    calib = calibration.load_calibration(model.name, "mediapipe")
    assert calib is not None and calib.frames > 300 and calib.quality_threshold > 0.03
    assert calibration.fit_options_for(model, "mediapipe")["huber"] == calib.huber
    assert calibration.fit_options_for(model, None) == {}  # landmarks given as files: the plain fit
    assert calibration.fit_options_for(toy_model(), "mediapipe") == {}  # the toy head is synthetic
    assert calibration.fit_options_for(model, "dlib") == calibration.UNCALIBRATED_REAL_FIT


# -- real frames -----------------------------------------------------------------------------------

def _real_landmarks(name, frames):
    video = SHARED / "real-videos" / name
    if not video.exists():
        pytest.skip(f"real clips not available: {video} is absent (set PNCC_SHARED_DATA)")
    detectors = pytest.importorskip("reenact.face3d.detectors")
    from reenact.data.framing import crop_boxes, to_crop
    from reenact.data.video import iter_frames

    try:
        detector = detectors.MediapipeDetector(video=True)
    except detectors.DetectorUnavailable as err:
        pytest.skip(str(err))
    points, images = [], []
    with detector:
        for index, frame in enumerate(iter_frames(video)):
            if index >= frames:
                break
            found = detector.detect(frame)
            if found is not None:
                points.append(found.landmarks)
                images.append(frame)
    points = np.array(points)
    boxes = crop_boxes(points, 1.7, 2.0)
    return to_crop(points, boxes, 256), images, boxes


def _write_overlays(name, model, fit, landmarks, images, boxes):
    """The crop overlays (PNCC of the fit, detected and fitted landmarks) of the worst frame (largest
    rms / IOD) and a median one: out/test-artifacts/face3d/<name>_{worst,median}_sfm_overlay.png,
    the frames to judge by eye against their ``valid`` flag (in the file name)."""
    if importlib.util.find_spec("pncc_cuda") is None:
        return  # overlay artifacts need the built rasterizer; the assertions above stand without them
    from PIL import Image

    from reenact.data.framing import crop_frame
    from reenact.face3d.visualize import overlay, render_fit_pncc

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    order = fit.rms_iod.argsort()
    for label, index in (("worst", int(order[-1])), ("median", int(order[len(order) // 2]))):
        crop = crop_frame(images[index], boxes[index], 256)
        pncc, mask = render_fit_pncc(model, fit.alpha[index:index + 1], fit.beta[index:index + 1],
                                     fit.pose[index:index + 1], 256, 256)
        valid = "valid" if fit.ok[index] else "invalid"
        Image.fromarray(overlay(crop, pncc[0], mask[0], landmarks[index], fit.projected[index].numpy())).save(
            ARTIFACTS / f"{name}_{label}_{valid}_sfm_overlay.png")


@pytest.mark.parametrize("video", ["d11.mp4", "vox_driving.mp4"])
def test_real_clip_gets_a_plausible_identity_and_valid_frames(video):
    model = sfm_model()
    landmarks, images, boxes = _real_landmarks(video, 40)
    assert len(landmarks) >= 30
    calibrated = fit_landmarks(model, torch.from_numpy(landmarks), **calibration.fit_options_for(model, "mediapipe"))
    alpha = calibrated.clip_alpha[0]
    assert alpha.norm() <= 2 * model.num_id ** 0.5 and alpha.abs().max() < 5
    iod = inter_ocular_distance(torch.from_numpy(landmarks)).float()
    inner = (calibrated.residuals[:, 17:].norm(dim=-1).median(-1).values / iod).median()
    assert inner < 0.03
    assert calibrated.ok.float().mean() >= 0.95
    _write_overlays(pathlib.Path(video).stem, model, calibrated, landmarks, images, boxes)
    legacy = fit_landmarks(model, torch.from_numpy(landmarks), **calibration.LEGACY_FIT)
    assert legacy.clip_alpha[0].norm() > 2 * alpha.norm()  # what the issue reported, for contrast


def test_full_body_clips_small_face_is_found_fitted_and_valid():
    """s13.mp4 (720x1080, a face about 40 px wide): no frame had a detection before the
    detector's second pass for small faces. Writes overlays (out/test-artifacts/face3d/s13_*.png)."""
    model = sfm_model()
    landmarks, images, boxes = _real_landmarks("s13.mp4", 24)
    assert len(landmarks) == 24  # a face in every frame
    width = (landmarks[:, :, 0].max(1) - landmarks[:, :, 0].min(1)) * (boxes[:, 2] - boxes[:, 0]) / 256
    assert np.median(width) < 100  # jaw to jaw in the frame (the inter-ocular distance is ~30 px)
    from reenact.face3d.detectors import MediapipeDetector

    with MediapipeDetector(small_faces=False) as first_pass_only:
        assert first_pass_only.detect(images[0]) is None  # the face mesh alone misses it
    fit = fit_landmarks(model, torch.from_numpy(landmarks), **calibration.fit_options_for(model, "mediapipe"))
    alpha = fit.clip_alpha[0]
    assert alpha.norm() <= 2 * model.num_id ** 0.5 and alpha.abs().max() < 5
    iod = inter_ocular_distance(torch.from_numpy(landmarks)).float()
    assert (fit.residuals[:, 17:].norm(dim=-1).median(-1).values / iod).median() < 0.03
    assert fit.ok.all()
    _write_overlays("s13", model, fit, landmarks, images, boxes)


# -- eos's Surrey Face Model files -----------------------------------------------------------------

def test_eos_files_load_to_the_same_model_in_every_archive_version(tmp_path):
    model = sfm_model()
    for version in (1, 2, 3, 4):
        eos_sfm.write_eos_files(model, tmp_path / f"v{version}", version=version)
        loaded = load_model(tmp_path / f"v{version}")
        torch.testing.assert_close(loaded.mean, model.mean)
        torch.testing.assert_close(loaded.id_basis, model.id_basis, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(loaded.exp_basis, model.exp_basis)
        assert torch.equal(loaded.faces, model.faces) and torch.equal(loaded.landmarks68, model.landmarks68)
        assert torch.equal(loaded.contour_right, model.contour_right) and loaded.exp_names == model.exp_names
        assert loaded.name == "sfm_3448" and not loaded.synthetic


def test_eos_toy_files_without_contours_keep_fixed_outline_points(tmp_path):
    model = toy_model()
    eos_sfm.write_eos_files(model, tmp_path)
    loaded = eos_sfm.load_eos_sfm(tmp_path, name="toy-as-eos")
    assert torch.equal(loaded.landmarks68, model.landmarks68) and not loaded.has_contours
    torch.testing.assert_close(loaded.id_basis, model.id_basis, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) // 2], "truncated"),
    (lambda b: struct.pack("<I", 9) + b[4:], "unknown eos MorphableModel version 9"),
    (lambda b: b[:4] + struct.pack("<ii", 2 ** 30, 2 ** 30) + b[12:], "needs"),  # a hostile matrix size
    (lambda b: b"", "needs 4 more bytes"),
])
def test_a_damaged_eos_model_fails_with_one_line_naming_the_file(tmp_path, damage, message):
    eos_sfm.write_eos_files(toy_model(), tmp_path)
    path = tmp_path / eos_sfm.SHAPE_FILE
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        eos_sfm.load_eos_sfm(tmp_path)
    assert str(path) in str(info.value)


def test_eos_mapping_and_contour_files_are_checked(tmp_path):
    eos_sfm.write_eos_files(toy_model(), tmp_path)
    (tmp_path / eos_sfm.MAPPING_FILE).write_text("landmarkMappings\n{\n 99 12\n}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="outside 1-68"):
        eos_sfm.load_eos_sfm(tmp_path)
    (tmp_path / eos_sfm.MAPPING_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="lacks the eos file"):
        eos_sfm.load_eos_sfm(tmp_path)
    (tmp_path / eos_sfm.CONTOURS_FILE).write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="model_contour"):
        eos_sfm.read_contours(tmp_path / eos_sfm.CONTOURS_FILE)


# -- the registry and --model ----------------------------------------------------------------------

def test_models_are_found_by_name_in_the_model_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REENACT_MODELS", str(tmp_path))
    eos_sfm.write_eos_files(toy_model(), tmp_path / "sfm_3448")
    assert registry.find_model("sfm_3448") == tmp_path / "sfm_3448"
    assert load_model("sfm_3448").num_vertices == toy_model().num_vertices
    with pytest.raises(FileNotFoundError, match="not installed.*3DDFA_V2"):
        load_model("bfm_noneck_v3")
    with pytest.raises(FileNotFoundError, match="neither a file"):
        load_model("no-such-model")
    from reenact import cli

    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "sfm_3448" in out and str(tmp_path / "sfm_3448") in out and "non-commercial" in out
    assert "bfm_noneck_v3" in out and "not installed" in out


def test_fit_clip_gets_the_joint_fits_identity_from_a_quarter_of_the_frames():
    from reenact.face3d.fit import fit_clip

    model = toy_model()
    alpha, _, landmarks = synthetic_clip(model, 24, seed=21, noise=0.5)
    joint = fit_landmarks(model, landmarks)
    quarter = fit_clip(model, landmarks, identity_stride=4)
    assert quarter.alpha.shape == joint.alpha.shape and quarter.clip_alpha.shape == joint.clip_alpha.shape
    assert (quarter.clip_alpha - joint.clip_alpha).norm() < 0.25 * joint.clip_alpha.norm()
    assert (quarter.clip_alpha[0] - alpha[0]).norm() < 1.5 * (joint.clip_alpha[0] - alpha[0]).norm() + 0.1
    assert quarter.ok.all() and quarter.rms_px.mean() < 1.5 * joint.rms_px.mean()
    # every frame's landmarks are explained with the clip's identity
    from reenact.face3d.synthetic import project_landmarks as project

    again = project(model, quarter.alpha, quarter.beta, quarter.pose).double()
    assert (again - quarter.projected.double()).abs().max() < 1e-3
