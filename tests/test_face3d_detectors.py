"""Landmark detectors: the mediapipe -> iBUG-68 table, real photos, faceless images, files."""
import pathlib

import numpy as np
import pytest
import torch

from face3d_support import sfm_model
from reenact.face3d.detectors import (
    MEDIAPIPE_TO_IBUG68, DetectorUnavailable, FileLandmarks, check_image, load_landmarks_file,
    make_detector,
)
from reenact.face3d.fit import fit_landmarks, inter_ocular_distance

ARTIFACTS = pathlib.Path(__file__).resolve().parents[1] / "out" / "test-artifacts" / "face3d"


def photos():
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the astronaut photo")
    cbook = pytest.importorskip("matplotlib.cbook", reason="matplotlib provides grace_hopper.jpg")
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
        hopper = np.asarray(image.convert("RGB"))
    return {"astronaut": data.astronaut(), "grace_hopper": hopper}


@pytest.fixture(scope="module")
def mediapipe_detector():
    pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 is not installed (optional extra)")
    detector = make_detector("mediapipe")
    yield detector
    detector.close()


def test_mapping_table_follows_the_face_mesh_topology():
    face_mesh = pytest.importorskip("mediapipe.python.solutions.face_mesh",
                                    reason="mediapipe==0.10.21 is not installed (optional extra)")

    def vertices(connections):
        return {i for edge in connections for i in edge}

    table = np.array(MEDIAPIPE_TO_IBUG68)
    assert table.shape == (68,) and len(set(table.tolist())) == 68 and table.max() < 468
    groups = {
        range(0, 17): face_mesh.FACEMESH_FACE_OVAL,
        range(17, 22): face_mesh.FACEMESH_RIGHT_EYEBROW, range(22, 27): face_mesh.FACEMESH_LEFT_EYEBROW,
        range(27, 36): face_mesh.FACEMESH_NOSE,
        range(36, 42): face_mesh.FACEMESH_RIGHT_EYE, range(42, 48): face_mesh.FACEMESH_LEFT_EYE,
        range(48, 68): face_mesh.FACEMESH_LIPS,
    }
    for points, connections in groups.items():
        assert set(table[list(points)].tolist()) <= vertices(connections), points


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_real_photos_fit_within_three_percent_of_the_inter_ocular_distance(name, mediapipe_detector):
    image = photos()[name]
    model = sfm_model()
    detection = mediapipe_detector.detect(image)
    assert detection is not None
    landmarks = detection.landmarks
    # iBUG layout sanity: jaw runs left to right across the image, eyes above the mouth.
    assert landmarks[0, 0] < landmarks[8, 0] < landmarks[16, 0]
    assert landmarks[36:48, 1].mean() < landmarks[30, 1] < landmarks[48:68, 1].mean()
    assert landmarks[36, 0] < landmarks[39, 0] < landmarks[42, 0] < landmarks[45, 0]
    fit = fit_landmarks(model, landmarks, detection.confidence)
    used = fit.landmark_vertices[0] >= 0
    error = fit.residuals[0].norm(dim=-1)[used].mean() / inter_ocular_distance(torch.from_numpy(landmarks))
    assert error < 0.03
    assert fit.ok.all()
    pncc_cuda = pytest.importorskip("pncc_cuda", reason="overlay artifacts need the built rasterizer")
    from PIL import Image

    from reenact.face3d.visualize import overlay, render_fit_pncc

    assert pncc_cuda is not None
    pncc, mask = render_fit_pncc(model, fit.alpha, fit.beta, fit.pose, *image.shape[:2])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, pncc[0], mask[0], landmarks, fit.projected[0].numpy())).save(
        ARTIFACTS / f"{name}_sfm_overlay.png")


def small_face_frame(shrink=0.45):
    """The astronaut photo shrunk into a grey 720x1080 (portrait) frame, as in a full-body shot:
    its face's landmarks are about 41 px wide. Returns the frame and where the full-size photo's
    landmarks land in it (the reference)."""
    from PIL import Image

    photo = photos()["astronaut"]
    with make_detector("mediapipe") as detector:
        reference = detector.detect(photo).landmarks
    size = round(photo.shape[1] * shrink)
    small = np.asarray(Image.fromarray(photo).resize((size, size), Image.BOX))
    frame = np.full((1080, 720, 3), 120, np.uint8)
    top, left = 620, 330
    frame[top:top + size, left:left + size] = small
    scale = size / photo.shape[1]
    return frame, (reference + 0.5) * scale - 0.5 + np.array([left, top])


def test_small_face_is_found_by_the_second_pass():
    pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 is not installed (optional extra)")
    from reenact.face3d.detectors import MediapipeDetector

    frame, expected = small_face_frame()
    assert np.ptp(expected[:, 0]) < 45  # a face about 40 px wide
    iod = inter_ocular_distance(torch.from_numpy(expected)).item()
    with MediapipeDetector(small_faces=False) as first_pass_only:
        assert first_pass_only.detect(frame) is None  # the face mesh alone misses it
    with MediapipeDetector() as detector:
        found = detector.detect(frame)
    assert found is not None and found.dense.shape == (478, 3)
    assert np.linalg.norm(found.landmarks - expected, axis=1).mean() < 0.06 * iod
    with MediapipeDetector(video=True, dense=False) as tracker:  # found, then tracked
        frames = [tracker.detect(frame) for _ in range(3)]
    assert all(f is not None and np.linalg.norm(f.landmarks - expected, axis=1).mean() < 0.06 * iod
               for f in frames)


def test_68_points_without_the_mesh_match_the_mesh_mapping():
    pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 is not installed (optional extra)")
    image = photos()["astronaut"]
    with make_detector("mediapipe") as dense, make_detector("mediapipe", dense=False) as sparse:
        full, light = dense.detect(image), sparse.detect(image)
    assert light.dense is None
    np.testing.assert_array_equal(light.landmarks, full.landmarks)
    np.testing.assert_array_equal(full.landmarks, full.dense[list(MEDIAPIPE_TO_IBUG68), :2])


def test_faceless_image_gives_no_detection(mediapipe_detector):
    flat = np.full((240, 320, 3), 127, np.uint8)
    noise = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    assert mediapipe_detector.detect(flat) is None
    assert mediapipe_detector.detect(noise) is None


def test_images_are_checked_before_detection(mediapipe_detector):
    with pytest.raises(ValueError, match="None"):
        mediapipe_detector.detect(None)
    with pytest.raises(ValueError, match="uint8"):
        mediapipe_detector.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(TypeError, match="numpy"):
        check_image([[1, 2, 3]])


def test_dlib_detector_is_optional():
    try:
        import dlib  # noqa: F401
    except ImportError:
        with pytest.raises(DetectorUnavailable, match="pip install dlib"):
            make_detector("dlib")
    else:
        pytest.importorskip("face_recognition_models", reason="dlib's 68-point model is not installed")
        detector = make_detector("dlib")
        assert detector.detect(np.full((120, 160, 3), 127, np.uint8)) is None


def test_unknown_detector_name():
    with pytest.raises(ValueError, match="unknown detector"):
        make_detector("crystal-ball")


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".txt", ".pts"])
def test_landmark_files(tmp_path, suffix):
    rng = np.random.default_rng(1)
    frames = 1 if suffix == ".pts" else 3
    points = rng.uniform(0, 100, (frames, 68, 2))
    path = tmp_path / f"marks ü{suffix}"
    if suffix == ".npy":
        np.save(path, points)
    elif suffix == ".npz":
        np.savez(path, landmarks=points)
    elif suffix == ".txt":
        np.savetxt(path, points.reshape(-1, 2))
    else:
        body = "\n".join(f"{x:.6f} {y:.6f}" for x, y in points[0])
        path.write_text(f"version: 1\nn_points:  68\n{{\n{body}\n}}\n")
    loaded = load_landmarks_file(path)
    np.testing.assert_allclose(loaded, points, atol=1e-5)
    reader = FileLandmarks(path)
    assert len(reader) == frames
    np.testing.assert_allclose(reader.detect().landmarks, points[0], atol=1e-5)


def test_landmark_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_landmarks_file(tmp_path / "absent.npy")
    np.save(tmp_path / "wrong.npy", np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"\(N, 68, 2\)"):
        load_landmarks_file(tmp_path / "wrong.npy")
    (tmp_path / "words.txt").write_text("not numbers\n")
    with pytest.raises(ValueError, match="cannot read landmarks"):
        load_landmarks_file(tmp_path / "words.txt")
    points = np.full((2, 68, 2), np.nan)
    np.save(tmp_path / "missing face.npy", points)
    reader = FileLandmarks(tmp_path / "missing face.npy")
    assert reader.detect() is None  # NaN marks a frame without a face
