"""`reenact reenact` and `reenact.inference.animate`: end to end on synthetic toy heads, and the
one-line errors of bad checkpoints, faceless inputs, unreadable media and outputs that would
overwrite an input."""
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from reenact import cli, training
from reenact.inference import commands as inference
from reenact.data import synth
from reenact.data.framing import to_crop
from reenact.data.video import iter_frames, probe
from reenact.face3d.loading import load_model
from reenact.face3d.pose import apply_pose
from reenact.inference import animate, feathered_mask, paste_back, pose_to_crop
from reenact.model import Reenactor, ReenactorConfig, build_discriminator

FRAMES = 6
SIZE = 64  # raw clips are SIZE high and 84 wide


def _save_checkpoint(path, config, meta_config=None, **meta):
    generator, discriminator = Reenactor(config.model), build_discriminator(config.model)
    values = {"format_version": training.FORMAT_VERSION, "step": 0,
              "config": (meta_config or config).to_dict(), "options": {"face_model": "toy"}}
    values.update(meta)
    training.save_checkpoint(path, generator, discriminator, torch.optim.Adam(generator.parameters()),
                             torch.optim.Adam(discriminator.parameters()), values)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A source image and a driving video of two toy-head identities, with their true landmarks,
    and an untrained 64x64 checkpoint."""
    root = tmp_path_factory.mktemp("inference")
    clips = synth.synth_dataset(root / "raw", 2, frames=FRAMES, size=SIZE, raw=True, seed=4)
    source = root / "source face.png"
    Image.fromarray(next(iter_frames(clips[0]))).save(source)
    source_landmarks = root / "source.npy"
    np.save(source_landmarks, np.load(clips[0].with_name("synth_00000.landmarks.npy"))[0])
    torch.manual_seed(0)
    checkpoint = _save_checkpoint(root / "ckpt.safetensors", ReenactorConfig.small(64))
    return {"root": root, "source": source, "source_landmarks": source_landmarks, "driving": clips[1],
            "driving_landmarks": clips[1].with_name("synth_00001.landmarks.npy"), "checkpoint": checkpoint}


def _args(media, out, crop_scale=2.0, **overrides):
    values = {"--checkpoint": media["checkpoint"], "--source": media["source"], "--driving": media["driving"],
              "--source-landmarks": media["source_landmarks"], "--driving-landmarks": media["driving_landmarks"],
              "--out": out}
    values.update(overrides)
    args = ["reenact"]
    for flag, value in values.items():
        if value is not None:
            args += [flag, str(value)]
    return args + ["--quiet"] + ([] if crop_scale is None else ["--crop-scale", str(crop_scale)])


def _fails(capsys, args, *fragments, status=1):
    assert cli.main(args) == status
    err = capsys.readouterr().err
    assert err.startswith("reenact: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_cli_writes_a_video_of_the_source_size(media, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert cli.main(_args(media, out)) == 0
    assert "wrote" in capsys.readouterr().out
    frames, _, codec, width, height = probe(out)
    source = np.asarray(Image.open(media["source"]))
    assert (frames, codec, (height, width)) == (FRAMES, "h264", source.shape[:2])
    decoded = list(iter_frames(out))
    assert len(decoded) == FRAMES
    # Outside the face crop the source is kept (up to H.264 error); inside, the generator painted.
    corner = np.abs(decoded[0][:8, :8].astype(int) - source[:8, :8]).mean()
    assert corner < 4, corner


def test_crop_scale_defaults_to_the_framing_the_checkpoint_was_trained_on(media, tmp_path, monkeypatch):
    torch.manual_seed(0)
    checkpoint = _save_checkpoint(tmp_path / "framed.safetensors", ReenactorConfig.small(64),
                                  data={"crop_scale": 2.0})
    used = {}

    def recording_animate(*args, **kwargs):
        used[name] = kwargs["crop_scale"]
        return animate(*args, **kwargs)

    monkeypatch.setattr(inference, "animate", recording_animate)
    videos = {}
    for name, scale in (("recorded", None), ("explicit", 2.0), ("prepare", 1.7)):
        out = tmp_path / f"{name}.mp4"
        assert cli.main(_args(media, out, crop_scale=scale, **{"--checkpoint": checkpoint})) == 0
        videos[name] = np.stack(list(iter_frames(out))).astype(int)
    assert used == {"recorded": 2.0, "explicit": 2.0, "prepare": 1.7}
    # Not bit-equal: BLAS results may depend on buffer alignment from one call to the next (seen
    # in CI), and one ulp can flip a rounded pixel. Another framing moves every pixel.
    assert np.abs(videos["recorded"] - videos["explicit"]).mean() < 0.05
    assert np.abs(videos["recorded"] - videos["prepare"]).mean() > 1


def test_side_by_side_has_four_panels(media, tmp_path):
    out = tmp_path / "sbs.webm"
    assert cli.main(_args(media, out, **{"--side-by-side": None}) + ["--side-by-side", "--pose", "absolute"]) == 0
    frames, _, codec, width, height = probe(out)
    source = np.asarray(Image.open(media["source"]))
    assert (frames, codec, height, width) == (FRAMES, "vp9", source.shape[0], 4 * source.shape[1])
    first = next(iter_frames(out))
    panel = source.shape[1]
    assert np.abs(first[:, :panel].astype(int) - source).mean() < 4  # panel 1 is the source
    pncc = first[:, 2 * panel:3 * panel]
    assert (pncc.max(-1) < 20).mean() > 0.5 and pncc.max() > 100  # P_d' on black


def test_driving_frames_without_a_face_hold_the_last_good_one(media, tmp_path, capsys):
    landmarks = np.load(media["driving_landmarks"])
    landmarks[[0, 3, 4]] = np.nan
    path = tmp_path / "gaps.npy"
    np.save(path, landmarks)
    out = tmp_path / "gaps.mp4"
    assert cli.main(_args(media, out, **{"--driving-landmarks": path})) == 0
    assert "3 of 6 driving frame(s) had no face" in capsys.readouterr().out
    assert probe(out)[0] == FRAMES
    landmarks[:] = np.nan
    np.save(path, landmarks)
    _fails(capsys, _args(media, tmp_path / "none.mp4", **{"--driving-landmarks": path}),
           "no face found in any of the 6 driving frames")


def test_faceless_source_and_mismatched_landmarks_are_one_line_errors(media, tmp_path, capsys):
    path = tmp_path / "nan.npy"
    np.save(path, np.full((68, 2), np.nan))
    _fails(capsys, _args(media, tmp_path / "a.mp4", **{"--source-landmarks": path}), "no face found in the source image")
    short = tmp_path / "short.npy"
    np.save(short, np.load(media["driving_landmarks"])[:4])
    _fails(capsys, _args(media, tmp_path / "b.mp4", **{"--driving-landmarks": short}), "has 4 frames", "the video has")


def test_incompatible_checkpoints_are_refused(media, tmp_path, capsys):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    _fails(capsys, _args(media, tmp_path / "o.mp4", **{"--checkpoint": plain}), "not a reenact training checkpoint")
    future = _save_checkpoint(tmp_path / "future.safetensors", ReenactorConfig.small(64), format_version=99)
    _fails(capsys, _args(media, tmp_path / "o.mp4", **{"--checkpoint": future}), "checkpoint format 99")
    other = ReenactorConfig.small(64).to_dict()
    other["model"]["decoder_channels"] = [16, 8, 8]
    mismatch = _save_checkpoint(tmp_path / "mismatch.safetensors", ReenactorConfig.small(64),
                                meta_config=ReenactorConfig.from_dict(other))
    _fails(capsys, _args(media, tmp_path / "o.mp4", **{"--checkpoint": mismatch}), "do not fit its model config")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    _fails(capsys, _args(media, tmp_path / "o.mp4", **{"--checkpoint": garbage}), "cannot read checkpoint")
    pickled = tmp_path / "ckpt.pt"
    pickled.write_bytes(b"not a pickle either")
    _fails(capsys, _args(media, tmp_path / "o.mp4", **{"--checkpoint": pickled}), "refusing to read")
    _fails(capsys, _args(media, tmp_path / "o.mp4", **{"--checkpoint": tmp_path / "absent.safetensors"}),
           "checkpoint not found")
    assert not (tmp_path / "o.mp4").exists()


def test_unreadable_media_and_overwriting_an_input_are_refused(media, tmp_path, capsys):
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"\x89PNG but not really")
    _fails(capsys, _args(media, tmp_path / "o.mp4", **{"--source": bad_image}), "cannot read image", "bad.png")
    bad_video = tmp_path / "bad.mp4"
    bad_video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    _fails(capsys, _args(media, tmp_path / "o.mp4", **{"--driving": bad_video}), "bad.mp4")
    _fails(capsys, _args(media, media["driving"]), "refusing to overwrite the input")
    _fails(capsys, _args(media, media["source"]), "refusing to overwrite the input")
    # Usage errors (a bad command line) exit with status 2, as argparse's own do.
    _fails(capsys, _args(media, tmp_path / "o.gif"), "--out must end in .mp4 or .webm", status=2)
    _fails(capsys, _args(media, tmp_path / "o.mp4", **{"--source": tmp_path / "missing.png"}), "--source not found",
           status=2)
    assert not (tmp_path / "o.mp4").exists()


# -- library -------------------------------------------------------------------------------------

def test_pose_to_crop_maps_like_to_crop():
    model = load_model("toy")
    pose = torch.tensor([[[2.0, 0.1, 0.0, 40.0], [0.1, -2.0, 0.0, 30.0], [0.0, 0.0, 2.0, 0.0]]])
    box = np.array([[10.0, 5.0, 70.0, 65.0]])
    points = apply_pose(model.mean[None, :50], pose)[..., :2].numpy()
    expected = to_crop(points, box, 64)
    mapped = apply_pose(model.mean[None, :50], pose_to_crop(pose, box[0], 64))[..., :2].numpy()
    np.testing.assert_allclose(mapped, expected, atol=1e-4)


def test_paste_back_keeps_the_frame_outside_the_mask():
    frame = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    crops = torch.ones(2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    out = paste_back(frame, crops, feathered_mask(mask, softness=1), (10.0, 5.0, 42.0, 37.0))
    assert out.shape == (2, 40, 50, 3)
    np.testing.assert_array_equal(out[:, :, :10], np.broadcast_to(frame[:, :10], out[:, :, :10].shape))
    np.testing.assert_array_equal(out[:, 38:], np.broadcast_to(frame[38:], out[:, 38:].shape))
    assert (out[:, 21, 26] == 255).all()  # the centre of the box is the crop's white
    soft = feathered_mask(mask)
    assert soft[..., 0, :].max() == 0 and soft[..., 8, 8].min() == 1  # zero at the crop border


def test_animate_relative_pose_starts_at_the_source_pose():
    """With pose_mode="relative" the first frame's P_d' has the source pose, wherever the driving
    face is; with "absolute" it has the driving face's pose in its crop."""
    torch.manual_seed(0)
    generator = Reenactor(ReenactorConfig.small(64).model).eval()
    model = load_model("toy")
    rng = np.random.default_rng(1)
    alpha, beta, pose = synth.random_clip_parameters(model, rng, 3, (64, 64))
    source = {"alpha": alpha, "beta": beta[0], "pose": pose[0]}
    image = np.full((64, 64, 3), 90, np.uint8)
    moved = pose.copy()
    moved[:, :2, 3] += [[-9.0, 4.0], [-9.0, 4.0], [0.0, 0.0]]  # the driving head sits elsewhere
    driving = {"alpha": alpha, "beta": beta, "pose": moved}
    whole = np.array([0.0, 0.0, 64.0, 64.0])
    same = list(animate(generator, model, image, source, {"beta": beta, "pose": pose}, source_box=whole))
    relative = list(animate(generator, model, image, source, driving, source_box=whole, batch_size=2))
    absolute = list(animate(generator, model, image, source, driving, pose_mode="absolute", source_box=whole,
                            driving_boxes=np.tile(whole, (3, 1))))
    assert len(relative) == 3 and relative[0].image.shape == (64, 64, 3) and relative[0].face.shape == (64, 64, 3)
    np.testing.assert_array_equal(relative[0].pncc, same[0].pncc)
    np.testing.assert_array_equal(relative[1].pncc, same[1].pncc)  # same motion since frame 0
    assert np.abs(absolute[0].pncc.astype(int) - same[0].pncc).mean() > 5  # absolute: moved head
    np.testing.assert_array_equal(absolute[2].pncc, same[2].pncc)  # frame 2 was not moved
    with pytest.raises(ValueError, match="pose_mode"):
        next(animate(generator, model, image, source, driving, pose_mode="sideways"))
    with pytest.raises(ValueError, match="lacks 'pose'"):
        next(animate(generator, model, image, source, {"beta": beta}))


class PerBatchForward(Reenactor):
    """animate's loop before the source was encoded once: `forward` on the source crop and P_s
    expanded to every batch of driving frames. The source is the test's own, not what animate
    passes to encode_source, so a wrong source there shows too."""

    def __init__(self, config, source_image, source_pncc):
        super().__init__(config)
        self.source = (source_image, source_pncc)

    def encode_source(self, source_image, source_pncc):
        return None

    def drive(self, encoding, driving_pncc, geometric=None):
        count = driving_pncc.shape[0]
        return self(*(x.expand(count, -1, -1, -1) for x in self.source), driving_pncc, geometric)


@pytest.mark.parametrize("pose_mode", ["relative", "absolute"])
def test_animate_encodes_the_source_once_and_matches_per_batch_forward(pose_mode, monkeypatch):
    from reenact.face3d.pncc import reconstruct_pncc

    model = load_model("toy")
    rng = np.random.default_rng(2)
    alpha, beta, pose = synth.random_clip_parameters(model, rng, 5, (64, 64))
    source = {"alpha": alpha, "beta": beta[0], "pose": pose[0]}
    driving = {"alpha": alpha, "beta": beta, "pose": pose}
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # the output depends on every pixel
    whole = np.array([0.0, 0.0, 64.0, 64.0])
    # With the whole 64x64 image as the source box, the crop is the image and the crop's pose is
    # the image's.
    crop = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        pncc_src, _ = reconstruct_pncc(model, torch.from_numpy(alpha)[None], torch.from_numpy(beta[:1]),
                                       torch.from_numpy(pose[:1]), size=64)
    torch.manual_seed(0)
    config = ReenactorConfig.small(64)
    generator = Reenactor(config.model).eval()
    per_batch = PerBatchForward(config.model, crop, pncc_src).eval()
    per_batch.load_state_dict(generator.state_dict())
    kwargs = dict(pose_mode=pose_mode, batch_size=2, source_box=whole, driving_boxes=np.tile(whole, (5, 1)))
    calls = {"encode_source": 0, "drive": 0}
    for name in calls:
        def counting(self, *args, _original=getattr(Reenactor, name), _name=name):
            calls[_name] += 1
            return _original(self, *args)
        monkeypatch.setattr(Reenactor, name, counting)

    frames = list(animate(generator, model, image, source, driving, **kwargs))
    assert calls == {"encode_source": 1, "drive": 3}  # batches of 2, 2 and 1 frames
    expected = list(animate(per_batch, model, image, source, driving, **kwargs))
    assert len(frames) == len(expected) == 5
    assert np.abs(frames[0].face.astype(int) - frames[3].face).mean() > 1  # the frames differ
    for frame, reference in zip(frames, expected):
        np.testing.assert_array_equal(frame.pncc, reference.pncc)
        # The batch-1 encoding runs E_a and E_g(P_s) at batch 1 instead of 2: float32 results
        # differ by about 1e-6, which can move a rounded pixel by one level.
        assert np.abs(frame.face.astype(int) - reference.face).max() <= 1
        assert np.abs(frame.image.astype(int) - reference.image).max() <= 1
        assert np.mean(frame.face != reference.face) < 0.01


def test_faceless_frames_hold_the_last_good_parameters():
    from reenact.inference import fill_missing as _fill_missing

    found = np.array([False, True, False, False, True, False])
    values = np.array([[1.0], [2.0]])
    np.testing.assert_array_equal(_fill_missing(found, values)[:, 0], [1, 1, 1, 1, 2, 2])


def test_cli_detects_faces_with_mediapipe(tmp_path, capsys):
    """The default path: no landmark files, mediapipe finds and the fitter fits the toy heads."""
    pytest.importorskip("mediapipe", reason="mediapipe is not installed (requirements/runtime.txt)")
    clips = synth.synth_dataset(tmp_path / "raw", 2, frames=FRAMES, size=128, raw=True, seed=4)
    source = tmp_path / "source.png"
    Image.fromarray(next(iter_frames(clips[0]))).save(source)
    torch.manual_seed(0)
    checkpoint = _save_checkpoint(tmp_path / "ckpt.safetensors", ReenactorConfig.small(64))
    out = tmp_path / "detected.mp4"
    assert cli.main(["reenact", "--checkpoint", str(checkpoint), "--source", str(source), "--driving",
                     str(clips[1]), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: {FRAMES} frame(s)" in printed
    # Faceless frames, if any, are counted and held; most frames must have been detected.
    held = [int(line.split()[0]) for line in printed.splitlines() if "had no face" in line]
    assert sum(held) <= FRAMES // 2, printed
    assert probe(out)[0] == FRAMES
