"""`reenact demo` plumbing with a tiny budget: files written and valid, deterministic given the seed."""
import importlib.util

import numpy as np
import torch
from PIL import Image

from reenact import cli, demo, training
from reenact.data.video import probe

TINY = demo.DemoRecipe(clips=2, frames=8, heldout_frames=8, steps=2, batch_size=2)


def _generator_state(checkpoint):
    tensors, _ = training.read_checkpoint(checkpoint)
    return {name: value for name, value in tensors.items() if name.startswith("G/")}


def test_demo_writes_a_video_and_a_grid_deterministically(tmp_path):
    first = demo.run_demo(tmp_path / "a", recipe=TINY, seed=1, quiet=True)
    frames, _, codec, width, height = probe(first["video"])
    scale, size = demo.DISPLAY_SCALE, TINY.resolution
    assert (frames, codec, width, height) == (TINY.heldout_frames, "h264", 4 * size * scale, size * scale)
    with Image.open(first["grid"]) as grid:
        rows = min(demo.GRID_ROWS, TINY.heldout_frames)
        assert grid.size == (4 * size * scale, rows * size * scale + 24)
        pixels = np.asarray(grid.convert("RGB"))
    assert first["steps"] == 2 and first["checkpoint"].name == "ckpt-00000002.safetensors"
    if importlib.util.find_spec("mediapipe") and importlib.util.find_spec("skimage"):
        # The real face comes first (tests/test_real_demo.py checks what it shows).
        assert first["real_grid"].is_file() and probe(first["real_video"])[0] > 50
    else:
        assert "real_grid" not in first
    if first["loss"] is not None:
        with Image.open(first["loss"]) as plot:
            assert plot.size[0] > 100
    # Same seed: same data, same weights, same grid, also when --minutes times the first steps and
    # resumes (here the measured budget stops at the probe's own 2 steps).
    second = demo.run_demo(tmp_path / "b", recipe=TINY, seed=1, minutes=1e-3, quiet=True)
    with Image.open(second["grid"]) as grid:
        np.testing.assert_array_equal(np.asarray(grid.convert("RGB")), pixels)
    a, b = _generator_state(first["checkpoint"]), _generator_state(second["checkpoint"])
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_demo_options_are_checked(tmp_path, capsys):
    for args, message in ((["--steps", "0"], "--steps must be >= 1"), (["--minutes", "-1"], "--minutes must be > 0"),
                          (["--clips", "0"], "--clips must be >= 1")):
        assert cli.main(["demo", "--out", str(tmp_path / "d")] + args) == 2  # usage errors
        err = capsys.readouterr().err
        assert err.startswith("reenact: error: ") and message in err and err.count("\n") == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["demo", "--out", str(blocker)]) == 2
    assert "--out must be a directory" in capsys.readouterr().err


def test_grid_rows_spread_over_the_driving_motion():
    pose = np.tile(np.array([[1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 1.0, 0]]), (10, 1, 1))
    beta = np.zeros((10, 2))
    beta[4, 0], beta[7, 1] = 1.0, 1.0  # only frames 4 and 7 differ from frame 0
    assert demo.diverse_frames(pose, beta, 3) == [0, 4, 7]
    assert demo.diverse_frames(pose, beta, 20) == list(range(10))


def test_demo_never_replaces_a_folder_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "run").mkdir(parents=True)
    (mine / "run" / "precious.txt").write_text("keep me")
    assert cli.main(["demo", "--out", str(mine), "--steps", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("reenact: error: ") and "non-empty folder that `reenact demo` did not create" in err
    assert (mine / "run" / "precious.txt").read_text() == "keep me"
    assert not (mine / demo.MARKER).exists()
    # Its own earlier output is replaced without complaint.
    again = tmp_path / "again"
    for _ in range(2):
        assert demo.run_demo(again, recipe=TINY, seed=1, quiet=True)["steps"] == 2


def test_demo_names_missing_packages_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "safetensors" else find_spec(name, *rest))
    status = cli.main(["demo", "--out", str(tmp_path / "demo"), "--steps", "1"])
    err = capsys.readouterr().err
    assert status == 1 and "safetensors" in err and "pip install safetensors" in err
    assert not (tmp_path / "demo").exists()  # nothing was started
