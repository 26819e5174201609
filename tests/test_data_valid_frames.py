"""The pair sampler draws only frames whose fit is valid; clips without two valid frames are skipped."""
import numpy as np
import pytest

from data_support import make_dataset
from reenact.data import format as fmt
from reenact.data import loaders, pairs
from reenact.data.dataset import ClipDataset

COUNTS = np.array([30, 12, 50, 9])


def _all_specs(counts, valid=None, epochs=4, config=pairs.PairConfig()):
    return [spec for epoch in range(epochs)
            for batch in pairs.epoch_schedule(counts, 2, seed=3, epoch=epoch, config=config, valid_frames=valid)
            for spec in batch]


def test_pairs_come_from_valid_frames_only():
    rng = np.random.default_rng(0)
    valid = [np.flatnonzero(rng.random(n) < 0.4) for n in COUNTS]
    valid = [v if v.size >= 2 else np.array([0, 1]) for v in valid]
    specs = _all_specs(COUNTS, valid, epochs=20, config=pairs.PairConfig(min_gap=1, max_gap=8))
    for spec in specs:
        assert spec.source in valid[spec.clip] and spec.driving in valid[spec.clip]
        assert spec.source != spec.driving


def test_all_valid_gives_exactly_the_old_pairs():
    every = [np.arange(n) for n in COUNTS]
    assert _all_specs(COUNTS, every) == _all_specs(COUNTS, None)


def test_replacement_lands_on_a_valid_frame():
    valid = [np.arange(30), np.array([3, 7]), np.arange(50), np.arange(9)]
    spec = pairs.PairSpec(clip=0, source=20, driving=25, flip=False, gain=(1.0, 1.0, 1.0), bias=0.0, pad=False)
    stand_in = pairs.replacement(spec, COUNTS, valid)
    assert stand_in.clip == 1 and stand_in.pad and {stand_in.source, stand_in.driving} <= {3, 7}
    assert pairs.replacement(spec, COUNTS).source == 11  # without valid lists: clipped to the length


@pytest.mark.parametrize("valid, message", [
    ([np.array([0])] * 4, "valid_frames of clip 0"),
    ([np.array([0, 40])] + [np.array([0, 1])] * 3, "below 30"),
    ([np.array([5, 2])] + [np.array([0, 1])] * 3, "increasing"),
    ([np.array([0, 1])] * 3, "lists 3 clips"),
])
def test_bad_valid_frame_lists_are_refused(valid, message):
    with pytest.raises(ValueError, match=message):
        pairs.epoch_schedule(COUNTS, 2, seed=0, valid_frames=valid)


def test_loader_skips_invalid_frames_and_clips_without_two(tmp_path):
    root = make_dataset(tmp_path / "data", clips=3, frames=12)
    records = fmt.read_manifest(root)
    marks = {0: [2, 9], 1: [4]}  # clip 0 keeps two valid frames, clip 1 only one
    for clip, keep in marks.items():
        path = root / records[clip].params
        params = fmt.load_params(path)
        valid = np.zeros(records[clip].frames, bool)
        valid[keep] = True
        fmt.save_params(path, **{k: params[k] for k in ("alpha", "pose", "beta", "landmarks", "crop_box")},
                        valid=valid, identity=str(params["identity"]), model_name=str(params["model_name"]),
                        image_size=int(params["image_size"]))
    dataset = ClipDataset(root, max_skip_fraction=0.5)
    assert len(dataset) == 2 and "1 of 12 frames have a valid fit" in dataset.skipped[0][1]
    assert dataset.valid_frames[0].tolist() == [2, 9]
    loader = loaders.FallbackLoader(dataset, batch_size=2, seed=1, config=pairs.NO_AUGMENTATION)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            for clip, source, driving in zip(batch["clip"].tolist(), batch["frame_source"].tolist(),
                                             batch["frame_driving"].tolist()):
                if clip == 0:
                    assert {source, driving} == {2, 9}


def test_clips_folder_may_be_an_owners_symlink_but_paths_may_not_escape(tmp_path):
    import shutil

    root = make_dataset(tmp_path / "data", clips=2, frames=8)
    shutil.move(root / "clips", tmp_path / "other-disk")
    (root / "clips").symlink_to(tmp_path / "other-disk", target_is_directory=True)
    assert len(ClipDataset(root)) == 2  # a layout the owner chose
    records = fmt.read_manifest(root)
    escaping = [records[0].__class__(**{**vars(records[0]), "clip": "../other-disk/" + records[0].clip.split("/")[-1]}),
                records[1]]
    fmt.write_manifest(root, escaping)
    with pytest.raises(fmt.DatasetError, match="inside the dataset"):
        ClipDataset(root)
