"""Hostile and careless input (issue 15; RELIABILITY.md items 18-20), one table per command.

Every case runs the real command line in a subprocess (tests/hostile_runner.py, one per table)
and asserts its exit status (2 usage, 1 runtime), exactly one `reenact: error:` line naming the
problem, no traceback, a bounded peak memory (the payloads would take 1.5 GB or more), and
that the files around the target are unchanged (checksums). Payloads that would run code leave a
marker file if executed; the marker must be absent.
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from hostile_support import (
    check_case, npz_with_header, pickle_allocating, pickle_payload, png_header, run_cases, tree_digest,
    zip_bomb_npz)
from reenact import training
from reenact.data import format as fmt
from reenact.data import synth
from reenact.data.video import iter_frames

SIZE = 64
#: What a payload would allocate if it were not refused.
HUGE = 1_500_000_000


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs shared by the tables: a dataset, a 1-step training run, raw media with landmarks."""
    root = tmp_path_factory.mktemp("hostile")
    synth.synth_dataset(root / "data", 2, frames=6, size=SIZE, seed=0, identities=2, codec="vp9")
    checkpoint = training.train(training.TrainOptions(
        data=str(root / "data"), out=str(root / "run"), steps=1, batch_size=2, resolution=SIZE, perceptual=False,
        checkpoint_every=1, loader="fallback", device="cpu", progress=False))
    raw = synth.synth_dataset(root / "raw", 2, frames=4, size=SIZE, raw=True, seed=4)
    Image.fromarray(next(iter_frames(raw[0]))).save(root / "source.png")
    np.save(root / "source.npy", np.load(raw[0].with_name("synth_00000.landmarks.npy"))[0])
    zip_bomb_npz(root / "bomb.npz", "pose", 600)
    return {"root": root, "data": root / "data", "run": root / "run", "checkpoint": checkpoint,
            "source": root / "source.png", "source_landmarks": root / "source.npy", "driving": raw[1],
            "driving_landmarks": raw[1].with_name("synth_00001.landmarks.npy")}


def _rewrite_checkpoint(source, target, meta=None, tensors=None):
    """A copy of a checkpoint with its metadata and/or tensors edited in place by the callables."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        values = json.loads(handle.metadata()[training.METADATA_KEY])
        weights = {name: handle.get_tensor(name) for name in handle.keys()}
    if meta:
        meta(values)
    if tensors:
        tensors(weights)
    save_file(weights, str(target), metadata={training.METADATA_KEY: json.dumps(values)})
    return target


def _poisoned(weights):
    name = next(n for n in weights if n.startswith("G/") and weights[n].is_floating_point())
    weights[name][...] = float("nan")


def _bad_checkpoints(world, folder):
    """{case: (checkpoint path, expected message fragment)} shared by reenact and eval."""
    folder.mkdir()
    source = world["checkpoint"]

    def edit(name, **changes):
        def apply(values):
            for path, value in changes.items():
                *parents, key = path.split("__")
                target = values
                for parent in parents:
                    target = target[parent]
                target[key] = value
        return _rewrite_checkpoint(source, folder / f"{name}.safetensors", meta=apply)

    header_bomb = folder / "header.safetensors"
    header_bomb.write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    return {
        "channels 10^7": (edit("channels", config__model__correspondence_channels=10 ** 7), "correspondence_channels"),
        "nan weights": (_rewrite_checkpoint(source, folder / "nan.safetensors", tensors=_poisoned), "NaN"),
        "options a string": (edit("options", options="abc"), "options must be a JSON object"),
        "data a string": (edit("data", data="abc"), "data must be a JSON object"),
        "step abc": (edit("step", step="abc"), "step must be an integer"),
        "crop_scale -3": (edit("crop_minus", data__crop_scale=-3), "crop_scale must be"),
        "crop_scale 1e30": (edit("crop_huge", data__crop_scale=1e30), "crop_scale must be"),
        "header claims 1 TB": (header_bomb, "not a safetensors file"),
    }


def _digest_and_run(world, argvs, scratch, outputs):
    before = tree_digest(world["root"], skip=outputs + [scratch])
    results = run_cases(argvs, scratch)
    assert tree_digest(world["root"], skip=outputs + [scratch]) == before
    return results


def test_reenact_refuses_hostile_files_in_one_line(world, tmp_path):
    marker = tmp_path / "PAYLOAD-RAN"
    out = tmp_path / "out.mp4"
    base = {"--checkpoint": world["checkpoint"], "--source": world["source"], "--driving": world["driving"],
            "--source-landmarks": world["source_landmarks"], "--driving-landmarks": world["driving_landmarks"],
            "--out": out}

    def argv(**overrides):
        values = dict(base, **{f"--{k.replace('_', '-')}": v for k, v in overrides.items()})
        return ["reenact"] + [str(x) for pair in values.items() for x in pair] + ["--quiet"]

    table = [(argv(checkpoint=path), 1, fragment) for path, fragment in
             _bad_checkpoints(world, tmp_path / "ckpt").values()]
    table += [
        (argv(source=png_header(tmp_path / "bomb.png", 30000, 30000)), 1, "the limit of"),
        (argv(source=png_header(tmp_path / "tiny.png", 1, 1)), 1, "too small"),
        (argv(out=_folder(tmp_path / "a-folder.mp4")), 2, "names a folder"),
        (argv(out=world["source"].with_suffix(".png") / "x.mp4"), 2, "not a directory"),
        (argv() + ["--crop-scale", "1e30"], 2, "--crop-scale must be in"),
        (argv() + ["--crop-scale", "-3"], 2, "--crop-scale must be in"),
        (argv(checkpoint=pickle_payload(tmp_path / "evil.pt", marker)), 1, "refusing to read"),
        (argv(checkpoint=pickle_payload(tmp_path / "evil.safetensors", marker)), 1, "not a safetensors file"),
    ]
    results = _digest_and_run(world, [a for a, _, _ in table], tmp_path / "scratch", [tmp_path])
    for (_, status, fragment), result in zip(table, results):
        check_case(result, status, fragment)
    assert not out.exists() and not marker.exists()


def _folder(path):
    path.mkdir()
    return path


def _dataset_copy(world, folder, manifest=None, params=None):
    """A copy of the dataset with its manifest text and/or every clip's arrays replaced."""
    import shutil

    shutil.copytree(world["data"], folder)
    if manifest is not None:
        (folder / fmt.MANIFEST_NAME).write_bytes(manifest(folder / fmt.MANIFEST_NAME))
    if params is not None:  # every clip, so that none is left to evaluate
        for record in fmt.read_manifest(world["data"]):
            params(folder / record.params)
    return folder


def _edit_lines(field, value):
    def rewrite(path):
        lines = []
        for line in path.read_text().splitlines():
            data = json.loads(line)
            data[field] = value
            lines.append(json.dumps(data))
        return ("\n".join(lines) + "\n").encode()
    return rewrite


def _edit_params(**changes):
    def rewrite(path):
        arrays = dict(np.load(path))
        arrays.update(changes)
        np.savez(path, **arrays)
    return rewrite


def test_eval_refuses_hostile_files_in_one_line(world, tmp_path):
    marker = tmp_path / "PAYLOAD-RAN"
    data = tmp_path / "datasets"
    data.mkdir()
    first_line = (world["data"] / fmt.MANIFEST_NAME).read_text().splitlines()[0]
    datasets = {
        "not utf-8": (_dataset_copy(world, data / "latin1", manifest=lambda p: b"\xff\xfe" + p.read_bytes()),
                      "not UTF-8"),
        "nested [": (_dataset_copy(world, data / "nested", manifest=lambda p: b"[" * 60000), "nested too deeply"),
        "100 KB line": (_dataset_copy(world, data / "long_line", manifest=lambda p: b" " * 100000 + b"{}"),
                        "line longer than"),
        "duplicates": (_dataset_copy(world, data / "dup", manifest=lambda p: ((first_line + "\n") * 51).encode()),
                       "listed twice"),
        "identity 7": (_dataset_copy(world, data / "identity", manifest=_edit_lines("identity", 7)),
                       "identity must be a string"),
        "fps NaN": (_dataset_copy(world, data / "nan_fps", manifest=_edit_lines("fps", float("nan"))), "fps must be"),
        "fps -25": (_dataset_copy(world, data / "neg_fps", manifest=_edit_lines("fps", -25.0)), "fps must be"),
        "5000-char name": (_dataset_copy(world, data / "long", manifest=_edit_lines("clip", "c" * 5000 + ".webm")),
                           "characters long"),
        "300-char name": (_dataset_copy(world, data / "name", manifest=_edit_lines("clip", "c" * 300 + ".webm")),
                          "longer than 255 bytes"),
        "format_version [1,1]": (_dataset_copy(world, data / "version", params=_edit_params(
            format_version=np.array([1, 1]))), "format_version must be one integer"),
        "pose a string": (_dataset_copy(world, data / "pose", params=_edit_params(pose=np.array("abc"))),
                          "pose must be a numeric array"),
        "alpha too short": (_dataset_copy(world, data / "alpha", params=_edit_params(alpha=np.zeros(3, np.float32))),
                            "identity and"),
        "header 10^11 frames": (_dataset_copy(world, data / "header", params=lambda p: npz_with_header(
            p, "pose", (10 ** 11, 3, 4))), "claims shape"),
        "zip bomb": (_dataset_copy(world, data / "bomb", params=lambda p: p.write_bytes(
            (world["root"] / "bomb.npz").read_bytes())), "zip bomb"),
    }

    def argv(data_dir=world["data"], out=None, checkpoint=world["checkpoint"], *extra):
        return ["eval", "--checkpoint", checkpoint, "--data", data_dir, "--out", out or tmp_path / "out",
                "--detector", "none", "--quiet", *extra]

    table = [(argv(folder), 1, fragment) for folder, fragment in datasets.values()]
    table += [(argv(world["data"], None, path), 1, fragment)
              for path, fragment in _bad_checkpoints(world, tmp_path / "ckpt").values()]
    malformed = tmp_path / "malformed.safetensors"
    malformed.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    pickled = pickle_payload(tmp_path / "id.pth", marker)
    users = tmp_path / "users-folder"
    users.mkdir()
    (users / "thesis.txt").write_text("mine")
    table += [
        (argv(world["data"], None, world["checkpoint"], "--id-model", malformed), 1, "not valid JSON"),
        (argv(world["data"], None, world["checkpoint"], "--inception", malformed), 1, "not valid JSON"),
        (argv(world["data"], None, world["checkpoint"], "--id-model", pickled), 1, "never unpickles"),
        (argv(world["data"], users), 1, "did not create"),
        (argv(world["data"], world["source"] / "sub"), 1, "cannot be created"),
    ]
    results = _digest_and_run(world, [a for a, _, _ in table], tmp_path / "scratch", [tmp_path])
    for (_, status, fragment), result in zip(table, results):
        check_case(result, status, fragment)
    assert not marker.exists() and not (tmp_path / "out" / "eval.json").exists()
    assert (users / "thesis.txt").read_text() == "mine" and sorted(os.listdir(users)) == ["thesis.txt"]


def test_train_refuses_hostile_configs_and_checkpoints_in_one_line(world, tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()

    def config(name, text):
        (configs / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        return configs / name

    small = training.build_config(training.TrainOptions(data="", out="", resolution=SIZE)).to_dict()

    def with_model(**changes):
        values = json.loads(json.dumps(small))
        values["model"].update(changes)
        return json.dumps(values)

    def resumable(name, **changes):
        """A copy of the 1-step run whose checkpoint metadata has ``changes`` (key paths joined by __)."""
        import shutil

        run = tmp_path / name
        shutil.copytree(world["run"], run)
        (path,) = (run / training.CHECKPOINT_DIR).iterdir()

        def apply(values):
            for key_path, value in changes.items():
                *parents, key = key_path.split("__")
                target = values
                for parent in parents:
                    target = target[parent]
                target[key] = value
        _rewrite_checkpoint(path, path, meta=apply)
        return run

    def argv(out, *extra):
        return ["train", "--data", world["data"], "--out", out, "--steps", "12", "--batch-size", "2",
                "--loader", "fallback", "--device", "cpu", "--no-perceptual", "--quiet", *extra]

    fresh = tmp_path / "fresh"
    malformed = tmp_path / "vgg.safetensors"
    malformed.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    table = [
        (argv(fresh, "--config", config("channels.json", with_model(correspondence_channels=10 ** 7))), 1,
         "correspondence_channels"),
        (argv(fresh, "--config", config("decoder.json", with_model(decoder_channels=[100000, 16, 8]))), 1,
         "decoder_channels"),
        (argv(fresh, "--config", config("blocks.json", with_model(geometry_blocks=10 ** 6))), 1, "geometry_blocks"),
        (argv(fresh, "--config", config("channels8.json", with_model(geometry_channels=[10 ** 8, 16, 32]))), 1,
         "geometry_channels"),
        (argv(fresh, "--config", config("nested.json", "[" * 100000)), 1, "nested too deeply"),
        (argv(fresh, "--config", config("empty.json", "")), 1, "not valid JSON"),
        (argv(fresh, "--config", config("latin1.json", b'{"loss": {"reconstruction": 1}}\xff')), 1, "not UTF-8"),
        ([a for a in argv(fresh, "--config", config("vgg.json", json.dumps(dict(small, loss=dict(
            small["loss"], perceptual=1.0, perceptual_weights_path=str(malformed)))))) if a != "--no-perceptual"],
         1, "not valid JSON"),
        (argv(resumable("step_huge", step=1e300), "--resume"), 1, "step must be an integer"),
        (argv(resumable("step_abc", step="abc"), "--resume"), 1, "step must be an integer"),
        (argv(resumable("step_far", step=100), "--resume"), 1, "beyond --steps 12"),
        (argv(resumable("optim", optim_G__param_groups="x"), "--resume"), 1, "param_groups"),
        (argv(resumable("rng", rng__numpy=["MT19937", "x", 0, 0.0]), "--resume"), 1, "rng.numpy position"),
        (argv(resumable("options", options="abc"), "--resume"), 1, "options must be a JSON object"),
        (argv(tmp_path / "a-file" / "run"), 1, "cannot be created"),
        (argv(fresh, "--steps", "0"), 2, "--steps must be"),
    ]
    (tmp_path / "a-file").write_text("x")
    results = _digest_and_run(world, [a for a, _, _ in table], tmp_path / "scratch", [tmp_path])
    for (_, status, fragment), result in zip(table, results):
        check_case(result, status, fragment)
    assert not fresh.exists() and (tmp_path / "a-file").read_text() == "x"


def _bfm_folder(folder):
    """Where a 3DDFA_V2 BFM pickle goes: its parameter statistics file must sit beside it."""
    from reenact.face3d.tddfa import PARAM_STATS_NAME

    folder.mkdir()
    (folder / PARAM_STATS_NAME).write_bytes(b"read only after the BFM file")
    return folder / "bfm_noneck_v3.pkl"


def test_pncc_refuses_hostile_models_and_images_in_one_line(world, tmp_path):
    marker = tmp_path / "PAYLOAD-RAN"

    def argv(image=world["source"], *extra):
        return ["pncc", image, "--out", tmp_path / "out", "--landmarks", world["source_landmarks"], *extra]

    table = [
        (argv(png_header(tmp_path / "bomb.png", 30000, 30000)), 1, "the limit of"),
        (argv(png_header(tmp_path / "tiny.png", 1, 1)), 1, "too small"),
        (argv(world["source"], "--model", pickle_allocating(_bfm_folder(tmp_path / "bomb"), HUGE)), 1, "bytearray"),
        (argv(world["source"], "--model", pickle_payload(_bfm_folder(tmp_path / "evil"), marker)), 1,
         "refusing to load"),
        (argv(world["source"], "--model", npz_with_header(tmp_path / "m.npz", "mean", (10 ** 11, 3, 4))), 1,
         "claims shape"),
        (argv(world["source"], "--model", world["root"] / "bomb.npz"), 1, "zip bomb"),
        (["pncc", world["source"], "--out", world["source"] / "out", "--landmarks", world["source_landmarks"]], 1,
         "Not a directory"),
    ]
    results = _digest_and_run(world, [a for a, _, _ in table], tmp_path / "scratch", [tmp_path])
    for (_, status, fragment), result in zip(table, results):
        check_case(result, status, fragment)
    assert not marker.exists()


def test_prepare_and_synth_never_take_over_a_dataset_they_did_not_write(world, tmp_path):
    import shutil

    dataset = tmp_path / "synth-dataset"
    shutil.copytree(world["data"], dataset)
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    before = tree_digest(tmp_path)
    scratch = tmp_path.parent / f"{tmp_path.name}-scratch"
    raw = world["driving"].parent
    table = [
        (["prepare", raw, dataset, "--landmarks-from", raw, "--quiet"], 1, "did not create"),
        (["prepare", raw, users, "--landmarks-from", raw, "--quiet"], 1, "did not create"),
        (["synth", users, "--clips", "1", "--frames", "2", "--size", "16", "--quiet"], 1, "did not create"),
    ]
    results = run_cases([a for a, _, _ in table], scratch)
    for (_, status, fragment), result in zip(table, results):
        check_case(result, status, fragment)
    assert tree_digest(tmp_path) == before


@pytest.mark.slow
def test_reenact_memory_is_flat_in_the_driving_video_length(world, tmp_path):
    """`reenact reenact` streams its driving video: a 1080p clip of 160 frames raises the peak no
    more than one of 40 frames does (holding the extra 120 decoded frames would take 750 MB; a
    600-frame run is in bench/RESULTS.md). Each length runs in a process of its own, so the peaks
    compare directly. Frames are one flat colour (fast to encode and decode); the landmark files
    give the face, so the content is irrelevant."""
    from reenact.data.video import encode_video

    landmarks = np.load(world["source_landmarks"]) * 8.0 + np.array([600.0, 200.0])
    gray = np.full((1080, 1920, 3), 96, np.uint8)
    peaks = {}
    for frames in (40, 160):
        video = tmp_path / f"drive{frames}.mp4"
        encode_video(video, (gray for _ in range(frames)), fps=25.0, codec="h264")
        np.save(tmp_path / f"drive{frames}.npy", np.repeat(landmarks[None], frames, axis=0))
        (result,) = run_cases([["reenact", "--checkpoint", world["checkpoint"], "--source", world["source"],
                                "--source-landmarks", world["source_landmarks"], "--driving", video,
                                "--driving-landmarks", tmp_path / f"drive{frames}.npy",
                                "--out", tmp_path / f"out{frames}.mp4", "--quiet", "--batch-size", "16"]],
                              tmp_path / f"scratch{frames}")
        assert result["status"] == 0, result["stderr"][-500:]
        peaks[frames] = result["peak_mib"]
    assert peaks[160] - peaks[40] < 150, f"peak {peaks[40]:.0f} MiB for 40 frames, {peaks[160]:.0f} MiB for 160"
