"""The built-in mediapipe model through prepare -> train -> eval on a real clip (skips without
../shared/data/real-videos)."""
import itertools
import pathlib

import numpy as np
import pytest
import torch

pytest.importorskip("pncc_cuda", reason="pncc_cuda's extension is not built")
pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 is not installed (optional extra)")

from reenact import eval as evaluate, training  # noqa: E402
from reenact.data import format as fmt, prepare as prep  # noqa: E402
from reenact.data.video import encode_video, iter_frames  # noqa: E402

REAL_VIDEOS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "real-videos"
FRAMES, SIZE = 16, 64


@pytest.mark.slow
def test_prepare_train_and_eval_take_the_builtin_model(tmp_path):
    clip = REAL_VIDEOS / "d10.mp4"
    if not clip.is_file():
        pytest.skip(f"real videos not available: {clip} is absent")
    torch.set_num_threads(1)
    raw = tmp_path / "raw"
    raw.mkdir()
    encode_video(raw / "talk.mp4", list(itertools.islice(iter_frames(clip), FRAMES)), fps=25, codec="h264")
    data = tmp_path / "data"
    options = prep.PrepareOptions(size=SIZE, clip_length=FRAMES, min_clip_length=8, model="mediapipe")
    assert prep.prepare(raw, data, options, progress=False).prepared == 1
    record = fmt.read_manifest(data)[0]
    params = fmt.load_params(data / record.params)
    assert params["alpha"].shape == (1404,) and params["beta"].shape == (FRAMES, 1404)
    assert str(params["model_name"]).startswith("mediapipe")
    # The crop's mesh, re-posed from the stored parameters, lies inside the crop and on the face.
    from reenact.face3d import load_model

    model = load_model("mediapipe")
    vertices = model.image_vertices(torch.from_numpy(params["alpha"])[None], torch.from_numpy(params["beta"]),
                                    torch.from_numpy(params["pose"]))
    assert (vertices[..., :2] > 0).all() and (vertices[..., :2] < SIZE).all()
    eyes = vertices[:, [33, 263], :2].numpy()
    np.testing.assert_allclose(eyes, params["landmarks"][:, [36, 45]], atol=1.0)  # iBUG outer eye corners

    # No face_model given: train and eval take the one the dataset's parameter files name.
    options = training.TrainOptions(
        data=str(data), out=str(tmp_path / "run"), steps=2, batch_size=2, resolution=SIZE, perceptual=False,
        checkpoint_every=2, loader="fallback", device="cpu", progress=False)
    checkpoint = training.train(options)
    assert options.face_model == "mediapipe"
    results = evaluate.evaluate(evaluate.EvalOptions(
        checkpoint=str(checkpoint), data=str(data), out=str(tmp_path / "eval"), device="cpu", detector="mediapipe",
        progress=False))
    assert results["pairs"] == FRAMES - 1 and results["face_model"].startswith("mediapipe")
    warp, copy = results["baselines"]["geometric warp"], results["baselines"]["copy source"]
    assert 0 < copy["l1"]["mean"] < 0.5 and 0 < warp["l1"]["mean"] < 0.5
    # The dense re-fit: mediapipe's mesh of the real driving frames, re-fitted, agrees with the
    # stored parameters (the same fit of the same frames, through a 4x upsampled 64-px crop).
    floor = results["metrics"]["pose"]["driving_frame_vs_params"]
    assert floor["frames"] == FRAMES - 1 and floor["rotation_deg"] < 5
    # Copying the source keeps the source's pose and expression: the re-fit sees the difference
    # from the driving parameters, larger than the floor; the warp follows them.
    copied, warped = copy["pose"]["output_vs_params"], warp["pose"]["output_vs_params"]
    assert copied["expression_abs"] > floor["expression_abs"]
    assert warped["expression_abs"] < copied["expression_abs"]
