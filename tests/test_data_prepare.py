"""``reenact prepare``: crops and fits, resuming, the corrupt-media corpus, hangs and crashes, the CLI."""
import json

import numpy as np
import pytest

from data_support import build_corrupt_corpus, hanging_or_crashing_decoder, noisy_decoder
from reenact import cli
from reenact.data import format as fmt
from reenact.data import framing, prepare as prep
from reenact.data import synth, video
from reenact.data.dataset import ClipDataset, SkipBudgetExceeded

RAW_SIZE = 96
OPTIONS = prep.PrepareOptions(size=64, clip_length=14, min_clip_length=6)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    synth.synth_dataset(root, 2, frames=24, size=RAW_SIZE, raw=True, seed=7)
    return root


def _options(raw_dir, **changes):
    fields = dict(vars(OPTIONS), landmarks_from=str(raw_dir))
    fields.update(changes)
    return prep.PrepareOptions(**fields)


def test_prepare_crops_fits_and_splits(raw, tmp_path):
    out = tmp_path / "out"
    report = prep.prepare(raw, out, _options(raw), workers=2, progress=False)
    assert report.files == 2 and report.prepared == 2 and not report.skipped and report.frames_in == 48
    records = fmt.read_manifest(out)
    assert len(records) == 4  # 24 frames, at most 14 per clip -> 2 clips of 12 per video
    assert all(r.frames == 12 and r.size == 64 and r.codec == "vp9" for r in records)
    assert {r.source for r in records} == {"synth_00000.webm", "synth_00001.webm"}
    truth = np.load(raw / "synth_00000.landmarks.npy")
    for record in records[:2]:
        params = fmt.load_params(out / record.params, frames=record.frames)
        assert params["valid"].all()
        # crop boxes are square, smooth and contain the face; landmarks map back to the raw video
        box = params["crop_box"]
        np.testing.assert_allclose(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1], rtol=1e-5)
        assert np.abs(np.diff(box, 2, axis=0)).max() < 2.0
        first = int(record.clip.rsplit("_", 1)[1][:3]) * 12
        step = (box[:, 2] - box[:, 0]) / 64
        back = params["landmarks"] * step[:, None, None] + box[:, None, :2] + 0.5 * step[:, None, None] - 0.5
        np.testing.assert_allclose(back, truth[first:first + 12], atol=1e-3)
        # the fit explains the landmarks (toy head fitted to its own exact landmarks)
        from face3d_support import toy_model
        from reenact.face3d.synthetic import project_landmarks
        import torch

        fitted = project_landmarks(toy_model(), torch.from_numpy(params["alpha"])[None], torch.from_numpy(params["beta"]),
                                   torch.from_numpy(params["pose"])).numpy()
        iod = np.linalg.norm(params["landmarks"][:, 36:42].mean(1) - params["landmarks"][:, 42:48].mean(1), axis=-1)
        assert (np.sqrt(((fitted - params["landmarks"]) ** 2).sum(-1).mean(-1)) / iod).max() < 0.05
    assert ClipDataset(out).frame_counts.tolist() == [12] * 4
    # the report names the face model and gives each clip's fraction of valid frames
    written = json.loads((out / "prepare_report.json").read_text(encoding="utf-8"))
    assert written["model"] == report.model and "synthetic" in report.model
    assert written["valid_fraction"] == {r.clip: 1.0 for r in records}
    # and the CPU time of each stage over this run's frames, printed in the summary
    assert written["stage_frames"] == 48 and set(written["stage_seconds"]) == set(prep.STAGES)
    assert all(seconds >= 0 for seconds in written["stage_seconds"].values())
    assert "CPU ms per input frame: decode" in report.summary()


def test_prepare_resumes_without_duplicates(raw, tmp_path):
    out = tmp_path / "out"
    prep.prepare(raw, out, _options(raw), progress=False)
    first = (out / fmt.MANIFEST_NAME).read_text(encoding="utf-8")
    (out / fmt.MANIFEST_NAME).write_text(first.splitlines(keepends=True)[0], encoding="utf-8")  # as if interrupted
    report = prep.prepare(raw, out, _options(raw), progress=False)
    assert report.resumed == 2 and report.frames_in == 0
    assert (out / fmt.MANIFEST_NAME).read_text(encoding="utf-8") == first


def test_corrupt_corpus_is_skipped_and_reported(raw, tmp_path):
    """RELIABILITY 11 and 12: each bad file is skipped with a reason, a hang or a native crash
    costs one file, good files (awkward names included) are all prepared."""
    corpus = tmp_path / "corpus"
    good, must_skip, may_skip = build_corrupt_corpus(corpus, raw / "synth_00000.webm",
                                                     np.load(raw / "synth_00000.landmarks.npy"))
    out = tmp_path / "out"
    report = prep.prepare(corpus, out, _options(corpus), workers=2, timeout=8, max_skip_fraction=1.0,
                          progress=False, decode=hanging_or_crashing_decoder)
    reasons = dict(report.skipped)
    assert set(must_skip) <= set(reasons) <= set(must_skip) | set(may_skip)
    assert "0 bytes" in reasons["zero bytes.webm"]
    assert "no video stream" in reasons["audio only.mp4"]
    assert "unsupported video codec" in reasons["unknown codec.webm"]
    assert not any("unexpected" in reason for reason in reasons.values())
    assert "timed out" in reasons["hang.webm"] and "crashed (signal 6)" in reasons["crash.webm"]
    assert all(reason for reason in reasons.values())
    sources = {r.source for r in fmt.read_manifest(out)}
    assert set(good) <= sources
    assert sources <= set(good) | set(may_skip)
    opened = ClipDataset(out)  # whatever prepare kept decodes fully
    assert not opened.skipped
    saved = json.loads((out / "prepare_report.json").read_text(encoding="utf-8"))
    assert dict(map(tuple, saved["skipped"])) == reasons
    # A resumed run re-checks the budget over every file, and still writes the good files' manifest.
    (out / fmt.MANIFEST_NAME).unlink()
    with pytest.raises(SkipBudgetExceeded, match="more than max_skip_fraction=10%"):
        prep.prepare(corpus, out, _options(corpus), max_skip_fraction=0.1, progress=False)
    assert {r.source for r in fmt.read_manifest(out)} == sources


def test_prepare_with_mediapipe_sees_the_toy_head(raw, tmp_path):
    pytest.importorskip("mediapipe", reason="mediapipe is not installed")
    out = tmp_path / "out"
    report = prep.prepare(raw, out, prep.PrepareOptions(size=64, clip_length=24, min_clip_length=6),
                          progress=False)
    assert report.prepared == 2
    assert sum(r.frames for r in fmt.read_manifest(out)) >= 24


def test_a_faceless_video_is_skipped_with_its_size_and_what_the_detector_tried(tmp_path):
    pytest.importorskip("mediapipe", reason="mediapipe is not installed")
    path = tmp_path / "wall.mp4"
    video.encode_video(path, np.full((10, 96, 160, 3), 128, np.uint8), fps=25, codec="h264")
    with pytest.raises(video.MediaError, match="no face found in any of 10 frames") as raised:
        prep.process_file(path, "wall.mp4", tmp_path / "out", prep.PrepareOptions(size=64))
    assert "160x96" in str(raised.value) and "second pass for small faces" in str(raised.value)


def test_prepare_bad_arguments(raw, tmp_path):
    with pytest.raises(ValueError, match="codec"):
        prep.prepare(raw, tmp_path / "o", _options(raw, codec="av1"))
    with pytest.raises(ValueError, match="workers"):
        prep.prepare(raw, tmp_path / "o", _options(raw), workers=0)
    with pytest.raises(FileNotFoundError, match="raw video directory"):
        prep.prepare(tmp_path / "absent", tmp_path / "o", _options(raw))
    with pytest.raises(ValueError, match="must not be inside"):
        prep.prepare(raw, raw / "out", _options(raw))


def test_cli_synth_and_prepare_with_awkward_paths(tmp_path, capsys):
    raw_dir = tmp_path / "-raw videos ü"
    out_dir = tmp_path / "-out set 顔"
    assert cli.main(["synth", "--clips", "1", "--frames", "12", "--size", "64", "--raw", "--quiet", "--", str(raw_dir)]) == 0
    assert cli.main(["prepare", "--size", "64", "--min-clip-length", "6", "--landmarks-from", str(raw_dir),
                     "--quiet", "--", str(raw_dir), str(out_dir)]) == 0
    assert "prepared 1 of 1 file(s)" in capsys.readouterr().out
    assert len(fmt.read_manifest(out_dir)) == 1
    data_dir = tmp_path / "data set"
    assert cli.main(["synth", str(data_dir), "--clips", "2", "--frames", "6", "--size", "32", "--quiet"]) == 0
    assert cli.main(["synth", str(data_dir), "--clips", "2", "--quiet"]) == 1
    assert "already holds a dataset" in capsys.readouterr().err
    (raw_dir / "broken.webm").write_bytes(b"\x1a\x45\xdf\xa3 not really")
    assert cli.main(["prepare", "--max-skip-fraction", "0.1", "--landmarks-from", str(raw_dir), "--quiet",
                     "--", str(raw_dir), str(tmp_path / "out2")]) == 1
    assert "broken.webm" in capsys.readouterr().err
    assert cli.main(["synth", str(tmp_path / "x"), "--clips", "0"]) == 1
    assert "clips must be" in capsys.readouterr().err


def test_video_errors_are_clear(tmp_path):
    (tmp_path / "empty.webm").write_bytes(b"")
    with pytest.raises(video.MediaError, match="0 bytes"):
        video.probe(tmp_path / "empty.webm")
    with pytest.raises(ValueError, match="even"):
        video.encode_video(tmp_path / "odd.webm", np.zeros((2, 15, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="codec"):
        video.encode_video(tmp_path / "x.webm", np.zeros((2, 16, 16, 3), np.uint8), codec="theora")
    assert not list(tmp_path.glob(".partial-*"))


def test_native_console_output_of_workers_goes_to_a_log_file(raw, tmp_path, capfd):
    out = tmp_path / "out"
    prep.prepare(raw, out, _options(raw), workers=1, progress=False, decode=noisy_decoder)
    captured = capfd.readouterr()
    assert "NATIVE-NOISE" not in captured.err + captured.out
    assert "NATIVE-NOISE" in (out / prep.STATE_DIR / prep.NATIVE_LOG).read_text(encoding="utf-8")


def test_shards_split_the_inputs_and_merge_back_into_one_dataset(tmp_path):
    from reenact.data import merge

    raw = tmp_path / "raw"
    synth.synth_dataset(raw, 5, frames=12, size=RAW_SIZE, raw=True, seed=3)
    names = [str(p.relative_to(raw)) for p in prep.find_videos(raw)]
    owners = [merge.shard_of(name, 3) for name in names]
    assert owners == [merge.shard_of(name, 3) for name in names]  # deterministic
    options = _options(raw, clip_length=12)
    shards = []
    for index in range(3):
        shard = tmp_path / f"shard{index}"
        report = prep.prepare(raw, shard, options, progress=False, shard=(index, 3))
        assert report.files == owners.count(index)
        shards.append(shard)
    assert sum(len(fmt.read_manifest(s)) for s in shards) == 5  # every video in exactly one shard
    assert cli.main(["merge-datasets", str(tmp_path / "all"), *map(str, shards)]) == 0
    records = fmt.read_manifest(tmp_path / "all")
    assert sorted(r.source for r in records) == sorted(names)
    assert len(ClipDataset(tmp_path / "all")) == 5
    assert json.loads((tmp_path / "all" / "prepare_report.json").read_text(encoding="utf-8"))["clips"] == 5
    # the same shard twice is a duplicate: refused, nothing written
    with pytest.raises(fmt.DatasetError, match="duplicates"):
        merge.merge_datasets(tmp_path / "twice", [shards[0], shards[0], shards[1]])
    assert not (tmp_path / "twice").exists()


@pytest.mark.parametrize("text", ["3", "3/3", "-1/4", "a/b", "1/0"])
def test_bad_shard_specs_are_refused(text):
    from reenact.data.merge import parse_shard

    with pytest.raises(ValueError, match="--shard"):
        parse_shard(text)


def test_fast_crop_matches_the_reference_sampling_within_one_level():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(4)
    frame = cv2.GaussianBlur((rng.random((120, 90, 3)) * 255).astype(np.uint8), (5, 5), 1.5)
    for box in (np.array([10.3, 20.7, 70.1, 80.5]), np.array([-30.0, -25.0, 110.0, 115.0])):  # inside; past the edges
        step = (box[2] - box[0]) / 48
        fast, reference = framing.crop_frame(frame, box, 48), framing._crop_frame_torch(frame, box, 48, step)
        assert fast.shape == reference.shape == (48, 48, 3) and fast.dtype == np.uint8
        assert np.abs(fast.astype(int) - reference).max() <= 1
