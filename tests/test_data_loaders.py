"""Training loaders: DALI vs the PyTorch fallback, frame accuracy, sharding, broken clips, PNCC helper."""
import logging

import numpy as np
import pytest
import torch

from data_support import FRAMES, SIZE, copy_dataset, make_dataset, psnr
from face3d_support import toy_model
from reenact.data import format as fmt
from reenact.data import loaders, pairs, video
from reenact.data.dataset import ClipDataset, SkipBudgetExceeded
from reenact.data.pncc import batch_pncc

dali = pytest.importorskip("nvidia.dali", reason="DALI is not installed")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("loaders") / "data", clips=7)


def _images_to_uint8(images):
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def test_dali_and_fallback_give_the_same_pairs(dataset):
    fallback = loaders.FallbackLoader(dataset, batch_size=3, seed=11)
    daliloader = loaders.DaliLoader(dataset, batch_size=3, seed=11)
    assert len(fallback) == len(daliloader) == 3
    for epoch in (0, 1):
        fallback.set_epoch(epoch)
        daliloader.set_epoch(epoch)
        batches = list(zip(fallback, daliloader))
        assert len(batches) == 3
        for a, b in batches:
            assert a.keys() == b.keys()
            for key in a:
                if key in ("source", "driving"):
                    assert a[key].shape == b[key].shape == (3, 3, SIZE, SIZE)
                    assert a[key].dtype == b[key].dtype == torch.float32
                    assert a[key].min() >= -1 and a[key].max() <= 1
                    assert psnr(a[key].numpy(), b[key].numpy(), peak=2.0) > 40
                else:
                    torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert batches[0][0]["pad"].tolist() == [False] * 3 and batches[-1][0]["pad"].tolist() == [False, True, True]


def test_epochs_and_seeds_change_the_pairs(dataset):
    def frames(seed, epoch):
        loader = loaders.FallbackLoader(dataset, batch_size=7, seed=seed, epoch=epoch, config=pairs.NO_AUGMENTATION)
        batch = next(iter(loader))
        return torch.stack([batch["clip"], batch["frame_source"], batch["frame_driving"]]).tolist()

    assert frames(1, 0) == frames(1, 0)
    assert frames(1, 0) != frames(1, 1) and frames(1, 0) != frames(2, 0)


def test_dali_frames_match_pyav_frames(dataset):
    """Frame accuracy (RELIABILITY 13): DALI's frames are PyAV's frames of the same indices."""
    loader = loaders.DaliLoader(dataset, batch_size=4, seed=5, config=pairs.NO_AUGMENTATION)
    clips = loader.dataset.clips
    for batch in loader:
        for role in ("source", "driving"):
            images = _images_to_uint8(batch[role])
            for k in range(4):
                clip = clips[int(batch["clip"][k])]
                (reference,) = video.read_frames(clip.video, [int(batch[f"frame_{role}"][k])])
                assert psnr(images[k], reference) > 40
                # and the parameters are those of that frame
                frame = int(batch[f"frame_{role}"][k])
                np.testing.assert_array_equal(batch[f"pose_{role}"][k].numpy(), clip.params["pose"][frame])


def test_flip_mirrors_images_and_parameters(dataset):
    flip_all = pairs.PairConfig(flip_prob=1.0, gain_jitter=0.0, bias_jitter=0.0)
    for backend in ("fallback", "dali"):
        plain = next(iter(loaders.make_loader(dataset, backend=backend, batch_size=4, seed=2, config=pairs.NO_AUGMENTATION)))
        flipped = next(iter(loaders.make_loader(dataset, backend=backend, batch_size=4, seed=2, config=flip_all)))
        assert flipped["flip"].all() and not plain["flip"].any()
        assert torch.equal(plain["frame_source"], flipped["frame_source"])
        torch.testing.assert_close(flipped["source"], plain["source"].flip(-1))
        pose, landmarks = fmt.mirror_params(plain["pose_driving"].numpy(), plain["landmarks_driving"].numpy(), SIZE)
        np.testing.assert_allclose(flipped["pose_driving"].numpy(), pose)
        np.testing.assert_allclose(flipped["landmarks_driving"].numpy(), landmarks)


def test_colour_jitter_is_the_shared_affine_map(dataset):
    config = pairs.PairConfig(flip_prob=0.0, gain_jitter=0.2, bias_jitter=0.2)
    plain = next(iter(loaders.FallbackLoader(dataset, batch_size=4, seed=4, config=pairs.NO_AUGMENTATION)))
    jittered = next(iter(loaders.DaliLoader(dataset, batch_size=4, seed=4, config=config)))
    specs = pairs.epoch_schedule(ClipDataset(dataset).frame_counts, 4, 4, config=config)[0]
    for k, spec in enumerate(specs):
        expected = (torch.tensor(spec.gain)[:, None, None] * plain["source"][k] + spec.bias).clamp(-1, 1)
        assert psnr(expected.numpy(), jittered["source"][k].numpy(), peak=2.0) > 40
        assert not torch.equal(jittered["source"][k], plain["source"][k])


def test_sharding_pads_so_every_rank_runs_the_same_steps(dataset):
    counts = ClipDataset(dataset).frame_counts
    shards = [pairs.epoch_schedule(counts, 2, seed=0, shard_id=r, num_shards=3) for r in range(3)]
    assert {len(s) for s in shards} == {2}  # 7 clips, 3 ranks x 2 per step -> 2 full steps each
    samples = [spec for shard in shards for batch in shard for spec in batch]
    assert all(len(batch) == 2 for shard in shards for batch in shard)
    real = [s.clip for s in samples if not s.pad]
    assert sorted(real) == list(range(7))  # every clip once, padding flagged
    assert sum(s.pad for s in samples) == 12 - 7
    # a rank's samples do not depend on the world size's other ranks being computed
    loader = loaders.DaliLoader(dataset, batch_size=2, seed=0, shard_id=1, num_shards=3)
    got = [b["clip"].tolist() for b in loader]
    assert got == [[s.clip for s in batch] for batch in shards[1]]


def test_bad_arguments_raise_clear_errors(dataset):
    with pytest.raises(ValueError, match="shard_id"):
        loaders.FallbackLoader(dataset, batch_size=2, shard_id=3, num_shards=3)
    with pytest.raises(ValueError, match="batch_size"):
        loaders.FallbackLoader(dataset, batch_size=0)
    with pytest.raises(ValueError, match="min_gap"):
        pairs.PairConfig(min_gap=5, max_gap=2)
    with pytest.raises(ValueError, match="backend"):
        loaders.make_loader(dataset, backend="decord")
    with pytest.raises(fmt.DatasetError, match="not a prepared dataset"):
        loaders.FallbackLoader(dataset / "clips")


def test_broken_clips_are_skipped_and_logged(dataset, tmp_path, caplog):
    broken = copy_dataset(dataset, tmp_path / "broken")
    records = fmt.read_manifest(broken)
    (broken / records[0].clip).write_bytes(b"")  # 0 bytes
    data = (broken / records[1].clip).read_bytes()
    (broken / records[1].clip).write_bytes(data[: len(data) // 2])  # fewer frames than the manifest says
    (broken / records[2].params).unlink()  # parameters missing
    with caplog.at_level(logging.WARNING, logger="reenact.data"):
        opened = ClipDataset(broken, max_skip_fraction=0.5)
    assert [name for name, _ in opened.skipped] == [r.clip for r in records[:3]]
    reasons = " ".join(reason for _, reason in opened.skipped)
    assert "0 bytes" in reasons and "manifest says" in reasons and "not found" in reasons
    assert "skipping clip" in caplog.text
    for backend in ("fallback", "dali"):
        loader = loaders.make_loader(opened, backend=backend, batch_size=4, seed=0)
        batches = list(loader)
        assert len(batches) == 1 and batches[0]["source"].shape[0] == 4
    with pytest.raises(SkipBudgetExceeded, match="3 of 7 clips were skipped"):
        ClipDataset(broken, max_skip_fraction=0.2)


def test_clip_that_breaks_after_verification_is_replaced_and_logged(dataset, monkeypatch, caplog):
    opened = ClipDataset(dataset)
    broken = opened.clips[3].video
    read, suffixes = loaders.read_frames, loaders.keyframe_suffixes

    def failing(function):
        def wrapper(path, *args):
            if path == broken:
                raise video.MediaError("simulated decoder failure")
            return function(path, *args)
        return wrapper

    monkeypatch.setattr(loaders, "read_frames", failing(read))
    monkeypatch.setattr(loaders, "keyframe_suffixes", failing(suffixes))
    batches = {}
    for backend in ("fallback", "dali"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="reenact.data"):
            batches[backend] = list(loaders.make_loader(opened, backend=backend, batch_size=7, seed=0))
        assert len(batches[backend]) == 1 and batches[backend][0]["source"].shape[0] == 7
        assert 3 not in batches[backend][0]["clip"].tolist()
        assert "simulated decoder failure" in caplog.text
    for key in ("clip", "frame_source", "frame_driving", "pad", "pose_driving"):
        torch.testing.assert_close(batches["fallback"][0][key], batches["dali"][0][key], rtol=0, atol=0)


def test_h264_clips_go_to_the_fallback_on_cpu(tmp_path):
    root = make_dataset(tmp_path / "h264", clips=2, codec="h264", frames=10)
    with pytest.raises(SkipBudgetExceeded, match="codec h264 is not decodable"):
        loaders.DaliLoader(root, batch_size=2)
    with pytest.raises(ValueError, match="DALI cannot decode h264 on the CPU"):
        loaders.DaliLoader(ClipDataset(root), batch_size=2)
    loader = loaders.make_loader(root, batch_size=2)
    assert isinstance(loader, loaders.FallbackLoader)
    assert next(iter(loader))["source"].shape == (2, 3, SIZE, SIZE)


def test_batch_pncc_renders_source_and_reconstructed_driving(dataset):
    batch = next(iter(loaders.FallbackLoader(dataset, batch_size=2, seed=0, config=pairs.NO_AUGMENTATION)))
    out = batch_pncc(toy_model(), batch)
    for key in ("pncc_source", "pncc_driving"):
        assert out[key].shape == (2, 3, SIZE, SIZE) and 0 <= out[key].min() and out[key].max() <= 1
    # the face covers the centre of every crop and the PNCC is non-zero exactly where covered
    for key in ("mask_source", "mask_driving"):
        assert out[key][:, 0, SIZE // 2, SIZE // 2].eq(1).all()
    assert torch.equal(out["pncc_source"].amax(1, keepdim=True) > 0, out["mask_source"] > 0)
    with pytest.raises(ValueError, match="pose_driving"):
        batch_pncc(toy_model(), {k: v for k, v in batch.items() if k != "pose_driving"})


@pytest.mark.cuda
def test_dali_gpu_matches_dali_cpu(dataset):
    cpu = next(iter(loaders.DaliLoader(dataset, batch_size=4, seed=9)))
    gpu = next(iter(loaders.DaliLoader(dataset, batch_size=4, seed=9, device="cuda")))
    assert gpu["source"].is_cuda and gpu["pose_source"].is_cuda
    for key in cpu:
        if key in ("source", "driving"):
            assert psnr(cpu[key].numpy(), gpu[key].cpu().numpy(), peak=2.0) > 40
        else:
            torch.testing.assert_close(cpu[key], gpu[key].cpu(), rtol=0, atol=0)
    out = batch_pncc(toy_model(), gpu)
    assert out["pncc_driving"].is_cuda


@pytest.mark.cuda
def test_dali_gpu_decodes_h264_with_nvdec(tmp_path):
    root = make_dataset(tmp_path / "h264", clips=2, codec="h264", frames=FRAMES)
    gpu = next(iter(loaders.DaliLoader(root, batch_size=2, seed=0, device="cuda", config=pairs.NO_AUGMENTATION)))
    ref = next(iter(loaders.FallbackLoader(root, batch_size=2, seed=0, config=pairs.NO_AUGMENTATION)))
    assert psnr(ref["source"].numpy(), gpu["source"].cpu().numpy(), peak=2.0) > 35


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_keyframe_suffixes_decode_to_the_clip_frames(tmp_path, codec):
    root = make_dataset(tmp_path / codec, clips=1, codec=codec, frames=FRAMES)
    clip = ClipDataset(root, codecs=None).clips[0]
    full = list(video.iter_frames(clip.video))
    suffixes, keyframe_before = video.keyframe_suffixes(clip.video)
    assert sorted(suffixes) == sorted(set(keyframe_before.tolist())) and keyframe_before[0] == 0
    assert len(suffixes) == -(-FRAMES // video.DEFAULT_GOP)
    for key, stream in suffixes.items():
        path = tmp_path / f"suffix{key}.mkv"
        stream.tofile(path)
        decoded = list(video.iter_frames(path))
        assert len(decoded) == FRAMES - key
        for offset, frame in enumerate(decoded):
            np.testing.assert_array_equal(frame, full[key + offset])
