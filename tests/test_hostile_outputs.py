"""Output folders (RELIABILITY.md item 17): no command deletes through a link or overwrites a
folder it did not create. Every case checks the files outside the target by checksum."""
import os

import pytest

from hostile_support import tree_digest
from reenact import cli, demo, output_folders

TINY = demo.DemoRecipe(clips=1, frames=8, heldout_frames=8, steps=1, batch_size=1)


def _users_files(root):
    """A folder of the user's with a nested tree, returned with its checksums."""
    (root / "train" / "deep").mkdir(parents=True)
    (root / "train" / "deep" / "thesis.txt").write_text("years of work")
    (root / "notes.txt").write_text("keep")
    (root / "run").mkdir()
    (root / "run" / "photo.png").write_bytes(b"\x89PNG not really")
    return tree_digest(root)


def _earlier_demo(out):
    out.mkdir()
    (out / demo.MARKER).write_text("written by `reenact demo`\n")


@pytest.mark.parametrize("link", ["data", "run"])
def test_demo_never_deletes_through_a_link_in_its_output(tmp_path, link):
    outside = tmp_path / "outside"
    outside.mkdir()
    before = _users_files(outside)
    out = tmp_path / "d"
    _earlier_demo(out)
    os.symlink(outside, out / link)
    with pytest.raises(demo.DemoError, match="symbolic link"):
        demo.run_demo(out, recipe=TINY, seed=0, quiet=True)
    assert tree_digest(outside) == before
    assert (out / link).is_symlink()


def test_demo_cli_refuses_a_linked_data_folder_in_one_line(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    before = _users_files(outside)
    out = tmp_path / "d"
    _earlier_demo(out)
    os.symlink(outside, out / "data")
    assert cli.main(["demo", "--out", str(out), "--clips", "1", "--steps", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("reenact: error: ") and err.count("\n") == 1 and "symbolic link" in err
    assert tree_digest(outside) == before


def test_a_marker_that_is_a_link_neither_claims_the_folder_nor_is_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "d"
    out.mkdir()
    os.symlink(victim, out / demo.MARKER)
    assert not output_folders.owns(out, "demo")
    with pytest.raises(output_folders.OutputFolderError, match="did not create"):
        output_folders.claim(out, "demo", "test")
    empty = tmp_path / "e"
    empty.mkdir()
    os.symlink(victim, output_folders.marker_path(empty, "demo"))
    with pytest.raises(OSError):  # O_NOFOLLOW: the link's target is not truncated
        output_folders.write_marker(empty, "demo", "test")
    assert victim.read_text() == "precious"


def test_remove_inside_removes_links_inside_a_tree_without_following_them(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    before = _users_files(outside)
    root = tmp_path / "root"
    (root / "own" / "sub").mkdir(parents=True)
    os.symlink(outside, root / "own" / "sub" / "link")
    os.symlink(outside / "notes.txt", root / "own" / "file-link")
    output_folders.remove_inside(root, root / "own")
    assert not (root / "own").exists() and tree_digest(outside) == before
    with pytest.raises(output_folders.OutputFolderError, match="not inside"):
        output_folders.remove_inside(root, outside)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from train_support import make_dataset

    return make_dataset(tmp_path_factory.mktemp("hostile_data"), clips=2)


def _train(dataset, out, steps=1, **flags):
    from train_support import cli_args

    return cli.main(cli_args(dataset, out, steps, checkpoint_every=1, **flags))


def test_train_refuses_a_non_empty_folder_it_did_not_create(dataset, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "log.jsonl").write_text('{"my": "experiment"}\n')
    (out / "config.json").write_text('{"mine": true}')
    (out / "samples").mkdir()
    (out / "samples" / "step-00000001.png").write_bytes(b"my figure")
    before = tree_digest(out)
    assert _train(dataset, out) == 1
    err = capsys.readouterr().err
    assert err.startswith("reenact: error: ") and err.count("\n") == 1
    assert "did not create" in err and "--overwrite" in err
    assert tree_digest(out) == before
    # --resume does not claim it either: there is no run to continue.
    assert _train(dataset, out, resume=True) == 1
    assert tree_digest(out) == before and "did not create" in capsys.readouterr().err
    # --overwrite is the user's say-so.
    assert _train(dataset, out, overwrite=True) == 0
    assert output_folders.owns(out, "train") and (out / "checkpoints").is_dir()


def test_train_reuses_its_own_folder_and_resumes_an_unmarked_run(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(dataset, out, steps=1) == 0
    assert output_folders.owns(out, "train")
    # Its own folder: --resume continues; a fresh run there is refused only for its checkpoints.
    assert _train(dataset, out, steps=2, resume=True) == 0
    # A run from before runs were marked still resumes (its checkpoints show what it is).
    output_folders.marker_path(out, "train").unlink()
    assert _train(dataset, out, steps=3, resume=True) == 0
    assert output_folders.owns(out, "train")
    capsys.readouterr()


def test_train_reports_an_unwritable_out_in_one_line(dataset, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a folder below a file cannot be created, even by root
    assert _train(dataset, blocker / "run") == 1
    err = capsys.readouterr().err
    assert err.startswith("reenact: error: ") and err.count("\n") == 1 and "cannot be created" in err
    assert blocker.read_text() == "x"


def test_prepare_appends_resumes_and_skips_unnamable_files(tmp_path):
    """prepare owns its dataset: a rerun with another raw folder appends (the clips of the first
    stay listed), a malformed state file is processed again, and a raw file whose name is not
    UTF-8 is skipped and reported instead of aborting the run."""
    import shutil

    from reenact.data import format as fmt
    from reenact.data import prepare as prep
    from reenact.data import synth

    options = dict(size=32, clip_length=8, min_clip_length=6)
    first, second = tmp_path / "raw1", tmp_path / "raw2"
    synth.synth_dataset(first, 1, frames=8, size=48, raw=True, seed=1)
    synth.synth_dataset(second, 1, frames=8, size=48, raw=True, seed=2)
    for path in second.iterdir():  # another name, so that its clip is another clip
        path.rename(second / path.name.replace("synth_00000", "other"))
    out = tmp_path / "dataset"
    prep.prepare(first, out, prep.PrepareOptions(landmarks_from=str(first), **options), progress=False)
    assert output_folders.owns(out, "prepare")
    prep.prepare(second, out, prep.PrepareOptions(landmarks_from=str(second), **options), progress=False)
    assert sorted(r.source for r in fmt.read_manifest(out)) == ["other.webm", "synth_00000.webm"]

    for state in (out / prep.STATE_DIR).glob("*.json"):
        state.write_text('{"records": []}')  # no status: must be reprocessed, not a KeyError
    odd = second / b"caf\xe9.webm".decode("utf-8", "surrogateescape")
    shutil.copy(second / "other.webm", odd)
    report = prep.prepare(second, out, prep.PrepareOptions(landmarks_from=str(second), **options),
                          progress=False, max_skip_fraction=0.6)
    assert report.resumed == 0 and report.prepared == 1
    assert [reason for _, reason in report.skipped] == ["its file name is not valid UTF-8 (rename the file)"]
    assert sorted(r.source for r in fmt.read_manifest(out)) == ["other.webm", "synth_00000.webm"]
