"""The README's real-video recipe, through the command line, on ../shared/data/real-videos (skips
without it): ``reenact prepare`` -> ``reenact train`` -> ``reenact eval`` on a held-out clip ->
``reenact reenact`` of a real photo by a real driving clip, geometric and learned.

No ``--model`` / ``--face-model`` anywhere: real videos default to the built-in mediapipe model and
``train``/``eval`` take the model the dataset names. The clips are cut short and the training is
short (CPU time: about a minute on an idle core); the README's recipe trains longer.
"""
import itertools
import json

import numpy as np
import pytest
import torch

pytest.importorskip("pncc_cuda", reason="pncc_cuda's extension is not built")
pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 is not installed (optional extra)")

from reenact import cli  # noqa: E402
from reenact.data import format as fmt  # noqa: E402
from reenact.data.video import encode_video, iter_frames  # noqa: E402
from test_geometric_reenact import REAL_VIDEOS, _mouth_gap  # noqa: E402

TRAIN_CLIPS, HELD_CLIP, SOURCE_PHOTO = ("d10.mp4", "d12.mp4"), "d18.mp4", "s1.jpg"
TRAIN_FRAMES, HELD_FRAMES, SIZE, STEPS = 48, 32, 64, 60


def _cut(clip, out, frames):
    encode_video(out, list(itertools.islice(iter_frames(clip), frames)), fps=25, codec="h264")


@pytest.mark.slow
def test_real_video_recipe_prepare_train_eval_reenact(tmp_path, capsys):
    needed = [REAL_VIDEOS / name for name in TRAIN_CLIPS + (HELD_CLIP, SOURCE_PHOTO)]
    missing = [path.name for path in needed if not path.is_file()]
    if missing:
        pytest.skip(f"real videos not available: {REAL_VIDEOS} lacks {missing}")
    torch.set_num_threads(1)
    raw, held_raw = tmp_path / "raw", tmp_path / "held_raw"
    raw.mkdir()
    held_raw.mkdir()
    for name in TRAIN_CLIPS:
        _cut(REAL_VIDEOS / name, raw / name, TRAIN_FRAMES)
    _cut(REAL_VIDEOS / HELD_CLIP, held_raw / HELD_CLIP, HELD_FRAMES)
    data, held, run = tmp_path / "data", tmp_path / "held", tmp_path / "run"

    # 1. prepare: real videos -> the built-in mediapipe model, no --model needed.
    for source, target in ((raw, data), (held_raw, held)):
        assert cli.main(["prepare", str(source), str(target), "--size", str(SIZE), "--workers", "1",
                         "--quiet"]) == 0, capsys.readouterr().err
        assert {str(fmt.load_params(target / r.params)["model_name"]) for r in fmt.read_manifest(target)} == {
            "mediapipe face mesh (built-in, Apache-2.0)"}

    # 2. train: the small config at 64x64 on the CPU, L1 + warp losses (the face model comes from the dataset).
    assert cli.main(["train", "--data", str(data), "--out", str(run), "--resolution", str(SIZE),
                     "--steps", str(STEPS), "--checkpoint-every", str(STEPS), "--no-perceptual", "--no-gan",
                     "--loader", "fallback", "--device", "cpu", "--lr-g", "1e-3", "--quiet"]) == 0, capsys.readouterr().err
    checkpoint = run / "checkpoints" / f"ckpt-{STEPS:08d}.safetensors"
    assert checkpoint.is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["geometric_input"] is True  # the small preset's default

    # 3. eval on the held-out clip: model, geometric warp and copy source on the same pairs, with the
    # dense re-fit of the mediapipe model.
    evaluated = tmp_path / "eval"
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--data", str(held), "--out", str(evaluated),
                     "--device", "cpu", "--quiet"]) == 0, capsys.readouterr().err
    results = json.loads((evaluated / "eval.json").read_text())
    assert results["face_model"].startswith("mediapipe") and results["pairs"] == HELD_FRAMES - 1
    model, warp, copy = (results["metrics"], results["baselines"]["geometric warp"],
                         results["baselines"]["copy source"])
    for method in (model, warp, copy):
        assert "output_vs_params" in method["pose"], method["pose"]
    # The learned model, given the warp, beats copying the source on the unseen clip in L1 and SSIM.
    # Not yet in PSNR after this test's 60 steps (26.0 against 27.0 dB, the warp 27.5); the README's
    # 1,100 steps on 31 clips beat both (26.15 against 25.33 and 25.84 dB, bench/RESULTS.md).
    scores = {name: {k: round(m[k]["mean"], 4) for k in ("l1", "psnr", "ssim")}
              for name, m in (("model", model), ("warp", warp), ("copy", copy))}
    assert model["l1"]["mean"] < copy["l1"]["mean"] and model["ssim"]["mean"] > copy["ssim"]["mean"], scores

    # 4. reenact a real photo by a real driving clip, geometric (no checkpoint) and learned.
    photo, driving = REAL_VIDEOS / SOURCE_PHOTO, held_raw / HELD_CLIP
    frames = list(iter_frames(driving))
    from reenact.face3d.detectors import MediapipeDetector

    with MediapipeDetector() as detector:
        driver = np.array([_mouth_gap(detector, f) for f in frames])
        for mode, extra in (("geometric", []), ("learned", ["--checkpoint", str(checkpoint)])):
            out = tmp_path / f"{mode}.mp4"
            assert cli.main(["reenact", "--source", str(photo), "--driving", str(driving), "--out", str(out),
                             "--quiet"] + extra) == 0, capsys.readouterr().err
            output = list(iter_frames(out))
            assert len(output) == len(frames)
            result = np.array([_mouth_gap(detector, f) for f in output])
            found = np.isfinite(driver) & np.isfinite(result)
            assert found.mean() > 0.8, mode
            if mode == "geometric":
                # The output's mouth opens and closes with the driver's. Not asserted for the learned
                # mode: this test's 60-step model on 2 short clips has not learned the mouth
                # (correlation 0.27; 0.05 after 150 steps); the README's recipe (1,100 steps on 31
                # clips) reaches 0.975 (bench/RESULTS.md, "The real-video recipe, step 4").
                assert np.corrcoef(driver[found], result[found])[0, 1] > 0.8, mode
