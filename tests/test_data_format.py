"""The prepared dataset format: manifest and parameter files, validation, flip mirroring, synth output."""
import json

import numpy as np
import pytest
import torch

from data_support import FRAMES, SIZE, make_dataset, psnr
from face3d_support import toy_model
from reenact.data import format as fmt
from reenact.data import video
from reenact.data.synth import render_toy_frames
from reenact.face3d.synthetic import project_landmarks


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synth") / "data", clips=3)


def test_synth_writes_manifest_clips_and_params(dataset):
    records = fmt.read_manifest(dataset)
    assert len(records) == 3
    for record in records:
        assert record.frames == FRAMES and record.size == SIZE and record.codec == "vp9" and record.synthetic
        params = fmt.load_params(dataset / record.params, frames=record.frames)
        assert params["pose"].shape == (FRAMES, 3, 4) and params["alpha"].shape == (10,)
        assert str(params["model_name"]) == toy_model().name
        assert video.probe(dataset / record.clip)[:5] == (FRAMES, 25.0, "vp9", SIZE, SIZE)
    # identities are shared round-robin: 3 clips, 1 identity
    assert {r.identity for r in records} == {"synth-id0000"}


def test_params_are_aligned_with_frames(dataset):
    """Re-rendering a clip's stored parameters reproduces its decoded frames (same frame index)."""
    record = fmt.read_manifest(dataset)[1]
    params = fmt.load_params(dataset / record.params)
    decoded = np.stack(list(video.iter_frames(dataset / record.clip)))
    model = toy_model()
    mask_only = np.zeros((1, 3, SIZE, SIZE), np.float32)
    ones = torch.ones(1, 3, SIZE, SIZE)
    rendered_fg = render_toy_frames(model, params["alpha"], params["beta"], params["pose"], SIZE, SIZE, ones)
    rendered_bg = render_toy_frames(model, params["alpha"], params["beta"], params["pose"], SIZE, SIZE,
                                    torch.from_numpy(mask_only[0]))
    face = (rendered_fg == rendered_bg).all(-1)  # pixels the head covers (the background differs)
    for t in (0, FRAMES // 2, FRAMES - 1):
        same = psnr(decoded[t][face[t]], rendered_fg[t][face[t]])
        shifted = psnr(decoded[t][face[t]], rendered_fg[(t + 5) % FRAMES][face[t]])
        assert same > 28 and same > shifted + 3, (t, same, shifted)
    # stored landmarks are the exact projections of the stored parameters
    projected = project_landmarks(model, torch.from_numpy(params["alpha"])[None], torch.from_numpy(params["beta"]),
                                  torch.from_numpy(params["pose"])).numpy()
    np.testing.assert_allclose(params["landmarks"], projected, atol=1e-3)


def test_manifest_errors_name_the_line(tmp_path):
    with pytest.raises(fmt.DatasetError, match="no manifest.jsonl"):
        fmt.read_manifest(tmp_path)
    record = fmt.ClipRecord("clips/a.webm", "clips/a.npz", 10, 25.0, "x", "a.mp4", "vp9", 64)
    lines = [record.to_json(), "{not json", json.dumps(dict(json.loads(record.to_json()), format_version=99)),
             json.dumps(dict(json.loads(record.to_json()), clip="../outside.webm")),
             json.dumps({k: v for k, v in json.loads(record.to_json()).items() if k != "fps"})]
    for number, bad in enumerate(lines[1:], 2):
        (tmp_path / fmt.MANIFEST_NAME).write_text(lines[0] + "\n" + bad + "\n", encoding="utf-8")
        with pytest.raises(fmt.DatasetError, match="manifest.jsonl:2"):
            fmt.read_manifest(tmp_path)
    (tmp_path / fmt.MANIFEST_NAME).write_text(lines[0] + "\n\n", encoding="utf-8")
    assert fmt.read_manifest(tmp_path) == [record]


def test_params_validation(tmp_path):
    good = dict(alpha=np.zeros(10), pose=np.zeros((4, 3, 4)), beta=np.zeros((4, 5)), landmarks=np.zeros((4, 68, 2)),
                crop_box=np.zeros((4, 4)), valid=np.ones(4, bool), identity="x", model_name="toy", image_size=64)
    fmt.save_params(tmp_path / "ok.npz", **good)
    assert fmt.load_params(tmp_path / "ok.npz", frames=4)["pose"].shape == (4, 3, 4)
    with pytest.raises(fmt.DatasetError, match="manifest says 5"):
        fmt.load_params(tmp_path / "ok.npz", frames=5)
    with pytest.raises(fmt.DatasetError, match=r"landmarks must have shape \(T, 68, 2\)"):
        fmt.save_params(tmp_path / "bad.npz", **dict(good, landmarks=np.zeros((4, 5, 2))))
    with pytest.raises(fmt.DatasetError, match="pose has NaN"):
        fmt.save_params(tmp_path / "bad.npz", **dict(good, pose=np.full((4, 3, 4), np.nan)))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(fmt.DatasetError, match="cannot read parameter"):
        fmt.load_params(tmp_path / "junk.npz")
    with pytest.raises(fmt.DatasetError, match="not found"):
        fmt.load_params(tmp_path / "absent.npz")


def test_mirror_permutation_is_an_involution():
    assert sorted(fmt.IBUG68_MIRROR.tolist()) == list(range(68))
    np.testing.assert_array_equal(fmt.IBUG68_MIRROR[fmt.IBUG68_MIRROR], np.arange(68))


def test_mirrored_params_describe_the_flipped_frame():
    """The toy head is left-right symmetric: rendering mirrored parameters gives the flipped image."""
    model = toy_model()
    generator = torch.Generator().manual_seed(3)
    alpha = torch.randn(1, model.num_id, generator=generator)
    beta = torch.rand(2, model.num_exp, generator=generator) * 0.5
    from reenact.face3d.pose import compose_pose, euler_to_matrix

    rotation = euler_to_matrix(torch.tensor([25.0, -10.0]), torch.tensor([8.0, 3.0]), torch.tensor([-6.0, 12.0]))
    extent = float(model.mean[:, 1].max() - model.mean[:, 1].min())
    pose = compose_pose(rotation, torch.full((2,), 0.7 * SIZE / extent, dtype=torch.float64),
                        torch.tensor([[30.0, 33.0, 0.0], [34.0, 29.0, 0.0]], dtype=torch.float64)).float()
    landmarks = project_landmarks(model, alpha, beta, pose).numpy()
    pose_m, landmarks_m = fmt.mirror_params(pose.numpy(), landmarks, SIZE)
    # still a valid pose: linear block is s * F @ R with a proper rotation
    linear = pose_m[:, :, :3] * np.array([1.0, -1.0, 1.0])[:, None]
    scale = np.cbrt(np.linalg.det(linear))
    np.testing.assert_allclose(linear @ linear.transpose(0, 2, 1) / scale[:, None, None] ** 2,
                               np.broadcast_to(np.eye(3), (2, 3, 3)), atol=1e-4)
    np.testing.assert_allclose(project_landmarks(model, alpha, beta, torch.from_numpy(pose_m)).numpy(), landmarks_m, atol=2e-3)
    background = torch.zeros(3, SIZE, SIZE)
    original = render_toy_frames(model, alpha[0].numpy(), beta.numpy(), pose.numpy(), SIZE, SIZE, background)
    mirrored = render_toy_frames(model, alpha[0].numpy(), beta.numpy(), pose_m, SIZE, SIZE, background)
    covered, covered_m = original.any(-1)[:, :, ::-1], mirrored.any(-1)
    assert (covered & covered_m).sum() / (covered | covered_m).sum() > 0.97
    assert psnr(original[:, :, ::-1], mirrored) > 22


def test_vp9_keeps_every_frame_of_a_nearly_static_clip(tmp_path):
    """Small, slowly changing frames (a face that barely moves, at 64x64) are all encoded: the
    encoder never skips one so that the decoder repeats its predecessor (VP9 realtime speed 8 did:
    12 of 23 here), which would pair stored parameters with another frame's pixels."""
    rng = np.random.default_rng(0)
    base = rng.random((64, 64, 3)) * 200 + 20
    frames = np.stack([(base + 0.5 * t).astype(np.uint8) for t in range(24)])  # +1 level every 2 frames
    path = tmp_path / "static.webm"
    video.encode_video(path, frames, fps=25.0, codec="vp9")
    decoded = np.stack(list(video.iter_frames(path)))
    repeated = [t for t in range(1, len(decoded)) if np.array_equal(decoded[t], decoded[t - 1])]
    assert len(decoded) == len(frames) and repeated == [], repeated
