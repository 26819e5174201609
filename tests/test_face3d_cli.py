"""`reenact pncc`: images, videos, awkward paths, and clear errors for bad input."""
import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from face3d_support import toy_model
from reenact.cli import main
from reenact.face3d.synthetic import project_landmarks, random_parameters

pytest.importorskip("pncc_cuda", reason="pncc_cuda's extension is not built")
REPO = pathlib.Path(__file__).resolve().parents[1]


def write_image(path, size=(160, 200)):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def toy_landmarks(frames, image_size=160):
    model = toy_model()
    _, _, pose = random_parameters(model, frames, generator=torch.Generator().manual_seed(0), image_size=image_size)
    alpha = np.zeros(model.num_id, np.float32)
    return project_landmarks(model, alpha, None, pose).numpy()


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_image_with_landmark_file_and_awkward_names(tmp_path, capsys):
    folder = tmp_path / "in put ü"
    folder.mkdir()
    image = folder / "-face ü.png"
    write_image(image)
    marks = folder / "-marks.npy"
    np.save(marks, toy_landmarks(1))
    before = digest(image)
    status = main(["pncc", "--out", str(folder), "--landmarks", str(marks), "--", str(image)])
    assert status == 0
    assert digest(image) == before  # outputs never overwrite the input
    for suffix in ("_pncc.png", "_overlay.png", "_params.npz"):
        assert (folder / f"-face ü{suffix}").is_file()
    from reenact.face3d.pipeline import load_parameters

    loaded = load_parameters(folder / "-face ü_params.npz")
    assert loaded["pose"].shape == (1, 3, 4)
    with np.load(folder / "-face ü_params.npz") as params:
        assert params["pose"].shape == (1, 3, 4) and params["alpha"].shape == (1, toy_model().num_id)
        assert "synthetic" in str(params["model_name"])
        assert params["ok"].all()
    assert "synthetic model" in capsys.readouterr().out


def _mjpeg_clip(path, frames, size=(160, 160)):
    cv2 = pytest.importorskip("cv2", reason="video input needs OpenCV")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    for k in range(frames):
        writer.write(np.full((size[1], size[0], 3), (40 * k) % 256, np.uint8))
    writer.release()
    return path


def test_video_with_landmark_file_writes_pncc_and_overlay_videos(tmp_path):
    from reenact.data.video import probe

    video = _mjpeg_clip(tmp_path / "clip.avi", 4)
    marks = toy_landmarks(4)
    marks[2] = np.nan  # no face in frame 2
    np.save(tmp_path / "marks.npy", marks)
    out = tmp_path / "out"
    assert main(["pncc", str(video), "--out", str(out), "--landmarks", str(tmp_path / "marks.npy")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["clip_overlay.mp4", "clip_params.npz", "clip_pncc.mp4"]
    for kind in ("pncc", "overlay"):
        assert probe(out / f"clip_{kind}.mp4")[0] == 4  # every input frame, found or not
    with np.load(out / "clip_params.npz") as params:
        assert params["found"].tolist() == [True, True, False, True]
        assert params["frame_index"].tolist() == [0, 1, 3]
        np.testing.assert_allclose(params["clip_alpha"][0], params["alpha"][2])  # one shared identity
    # PNGs on request, for the frames with a face
    assert main(["pncc", str(video), "--out", str(tmp_path / "png"), "--png", "--landmarks", str(tmp_path / "marks.npy")]) == 0
    assert sorted(p.name for p in (tmp_path / "png" / "clip_pncc").iterdir()) == ["000000.png", "000001.png", "000003.png"]
    assert len(list((tmp_path / "png" / "clip_overlay").iterdir())) == 3


def test_video_frames_are_streamed_not_kept(tmp_path, monkeypatch):
    """Peak memory is flat in the video's length: decoded frames are released as they are used."""
    import gc
    import weakref

    from reenact.face3d import pipeline

    references = []

    class Frame(np.ndarray):  # ndarray subclasses accept weak references
        pass

    original = pipeline.video_frames

    def tracked(path):
        count, frames = original(path)

        def gen():
            for frame in frames:
                tracked_frame = frame.view(Frame)
                references.append(weakref.ref(tracked_frame))
                yield tracked_frame
                gc.collect()
                alive = sum(r() is not None for r in references)
                assert alive <= 3, f"{alive} decoded frames are still held"
        return count, gen()

    monkeypatch.setattr(pipeline, "video_frames", tracked)
    video = _mjpeg_clip(tmp_path / "long.avi", 12)
    np.save(tmp_path / "marks.npy", toy_landmarks(12))
    assert main(["pncc", str(video), "--out", str(tmp_path / "out"), "--landmarks", str(tmp_path / "marks.npy")]) == 0


@pytest.mark.parametrize("setup, message", [
    ("missing", "input not found"),
    ("garbage", "cannot read image"),
])
def test_bad_inputs_give_one_line_errors(tmp_path, capsys, setup, message):
    path = tmp_path / "input.png"
    if setup == "garbage":
        path.write_bytes(b"\x89PNG but not really")
    np.save(tmp_path / "marks.npy", toy_landmarks(1))
    status = main(["pncc", str(path), "--out", str(tmp_path / "out"), "--landmarks", str(tmp_path / "marks.npy")])
    err = capsys.readouterr().err
    assert status == 1 and message in err and "Traceback" not in err


def test_faceless_image_says_no_face_found(tmp_path, capsys):
    pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 is not installed (optional extra)")
    from PIL import Image

    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(tmp_path / "wall.png")
    status = main(["pncc", str(tmp_path / "wall.png"), "--out", str(tmp_path / "out")])
    assert status == 1 and "no face found" in capsys.readouterr().err
    assert not (tmp_path / "out" / "wall_params.npz").exists()


def test_real_photo_through_the_console_entry_point(tmp_path):
    pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 is not installed (optional extra)")
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the astronaut photo")
    from PIL import Image

    image = tmp_path / "-astronaut photo.png"
    Image.fromarray(data.astronaut()).save(image)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "python")]))
    done = subprocess.run([sys.executable, "-m", "reenact.cli", "pncc", "--out", str(tmp_path / "o"), "--", str(image)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "o" / "-astronaut photo_overlay.png").is_file()
    missing = subprocess.run([sys.executable, "-m", "reenact.cli", "pncc", str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "o")],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 1 and "input not found" in missing.stderr and "Traceback" not in missing.stderr


def test_pipeline_reports_faceless_frames_without_fitting(tmp_path):
    from reenact.face3d.detectors import FileLandmarks
    from reenact.face3d.pipeline import reconstruct

    np.save(tmp_path / "none.npy", np.full((2, 68, 2), np.nan))
    frames = [np.zeros((32, 32, 3), np.uint8)] * 2
    result = reconstruct(frames, toy_model(), FileLandmarks(tmp_path / "none.npy"))
    assert result.fit is None and not result.found.any()
    assert result.message == "no face found in any of 2 frames"
    with pytest.raises(ValueError, match="frame 0"):
        reconstruct([None], toy_model(), FileLandmarks(tmp_path / "none.npy"))
