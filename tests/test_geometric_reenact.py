"""`reenact reenact` without --checkpoint: the training-free geometric mode, pasted back as the
learned mode pastes."""
import pathlib

import numpy as np
import pytest
import torch

pytest.importorskip("pncc_cuda", reason="pncc_cuda's extension is not built")

from reenact import cli  # noqa: E402
from reenact.data import synth  # noqa: E402
from reenact.face3d.loading import load_model  # noqa: E402
from reenact.inference import GEOMETRIC_RESOLUTION, animate  # noqa: E402
from reenact.model import Reenactor, ReenactorConfig  # noqa: E402


def _toy_setup(frames=3):
    model = load_model("toy")
    rng = np.random.default_rng(1)
    alpha, beta, pose = synth.random_clip_parameters(model, rng, frames, (96, 96))
    # A smooth picture: resampling it twice (crop, paste back) blurs it little.
    y, x = np.mgrid[0:96, 0:96] / 96.0
    image = np.stack([np.sin(6 * x), np.cos(5 * y), np.sin(4 * (x + y))], -1)
    image = ((image + 1) * 127.5).astype(np.uint8)
    return model, image, {"alpha": alpha, "beta": beta[0], "pose": pose[0]}, {"beta": beta, "pose": pose}


def test_geometric_mode_pastes_back_like_the_learned_mode():
    """Same crop, same P_d', same paste: only the face differs between the two modes."""
    model, image, source, driving = _toy_setup()
    whole = np.array([0.0, 0.0, 96.0, 96.0])
    torch.manual_seed(0)
    generator = Reenactor(ReenactorConfig.small(64).model).eval()
    learned = list(animate(generator, model, image, source, driving, source_box=whole))
    geometric = list(animate(None, model, image, source, driving, source_box=whole))
    assert len(geometric) == 3
    for a, b in zip(learned, geometric):
        np.testing.assert_array_equal(a.box, b.box)
        assert b.image.shape == image.shape and b.face.shape == (GEOMETRIC_RESOLUTION, GEOMETRIC_RESOLUTION, 3)
        # P_d' is pasted through the same mask and box; the learned crop is 64, the geometric 256.
        assert np.abs(a.pncc.astype(int) - b.pncc.astype(int)).mean() < 2.0


def test_geometric_mode_with_the_sources_own_parameters_gives_back_the_source():
    model, image, source, _ = _toy_setup()
    own = {"beta": np.stack([source["beta"]] * 2), "pose": np.stack([source["pose"]] * 2)}
    frames = list(animate(None, model, image, source, own))
    for frame in frames:
        # Crop, identity warp and paste back resample twice: a little blur, no motion.
        assert np.abs(frame.image.astype(int) - image.astype(int)).mean() < 4.0
    moved = {"beta": own["beta"], "pose": own["pose"].copy()}
    moved["pose"][1, 0, 3] += 6.0  # the driving head moves right by 6 px after frame 0
    shifted = list(animate(None, model, image, source, moved))
    assert np.abs(shifted[1].image.astype(int) - image.astype(int)).mean() > 2 * np.abs(
        frames[1].image.astype(int) - image.astype(int)).mean()


def test_cli_without_a_checkpoint_runs_the_geometric_mode(tmp_path, capsys):
    pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 is not installed (optional extra)")
    pytest.importorskip("skimage.data", reason="scikit-image provides the astronaut photo")
    pytest.importorskip("matplotlib.cbook", reason="matplotlib provides grace_hopper.jpg")
    from PIL import Image

    from reenact.demo import real_face as real_demo
    from reenact.data.video import encode_video, iter_frames

    torch.set_num_threads(1)
    demo = real_demo.run_real_face()
    opened = max(i for i, label in enumerate(demo.labels) if label == "open mouth")
    picks = [0, opened - 4, opened, 0]
    driving = tmp_path / "driving.mp4"
    encode_video(driving, demo.results[picks], fps=10, codec="h264")
    source = tmp_path / "astronaut.png"
    Image.fromarray(demo.source).save(source)
    out = tmp_path / "out.mp4"
    assert cli.main(["reenact", "--source", str(source), "--driving", str(driving), "--out", str(out),
                     "--quiet"]) == 0
    assert "geometric (no checkpoint)" in capsys.readouterr().out
    frames = np.stack(list(iter_frames(out))).astype(int)
    assert len(frames) == len(picks)
    # The driving clip opens the mouth in frame 2 and closes it again in frame 3.
    mouth = np.abs(demo.results[opened].astype(int) - demo.source.astype(int)).max(-1) > 40
    change = np.abs(frames[2] - frames[0]).max(-1)
    assert change[mouth].mean() > 3 * change[~mouth].mean()
    # (the driving clip is H.264 and mediapipe tracks it in video mode: not bit-exact)
    assert np.abs(frames[3] - frames[0]).mean() < 0.6 * np.abs(frames[2] - frames[0]).mean()


REAL_VIDEOS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "real-videos"


def _mouth_gap(detector, image):
    """Inner-lip gap over the outer-eye-corner distance, from mediapipe's mesh (NaN: no face)."""
    points = detector.detect_dense(image)
    if points is None:
        return np.nan
    return np.linalg.norm(points[13, :2] - points[14, :2]) / np.linalg.norm(points[33, :2] - points[263, :2])


@pytest.mark.slow
def test_a_real_photo_follows_a_real_driving_clips_mouth(tmp_path):
    """Geometric mode on real data: a real portrait driven by the first 40 frames of a real
    talking clip opens and closes its mouth with the driver (mouth gap re-measured by mediapipe
    on the output). Copying the source would correlate 0."""
    pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 is not installed (optional extra)")
    source, clip = REAL_VIDEOS / "s1.jpg", REAL_VIDEOS / "d10.mp4"
    if not (source.is_file() and clip.is_file()):
        pytest.skip(f"real videos not available: {REAL_VIDEOS} lacks s1.jpg or d10.mp4")
    import itertools

    from reenact.data.video import encode_video, iter_frames
    from reenact.face3d.detectors import MediapipeDetector

    torch.set_num_threads(1)
    frames = list(itertools.islice(iter_frames(clip), 40))
    driving = tmp_path / "driving.mp4"
    encode_video(driving, frames, fps=25, codec="h264")
    out = tmp_path / "out.mp4"
    assert cli.main(["reenact", "--source", str(source), "--driving", str(driving), "--out", str(out), "--quiet"]) == 0
    output = list(iter_frames(out))
    assert len(output) == len(frames)
    with MediapipeDetector() as detector:
        driver = np.array([_mouth_gap(detector, f) for f in frames])
        result = np.array([_mouth_gap(detector, f) for f in output])
    found = np.isfinite(driver) & np.isfinite(result)
    assert found.mean() > 0.9
    assert np.ptp(driver[found]) > 0.1  # the clip does open its mouth
    assert np.corrcoef(driver[found], result[found])[0, 1] > 0.8
