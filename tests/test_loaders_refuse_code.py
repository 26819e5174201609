"""Every loader of user files refuses pickled code *before running it*.

Each payload would create a marker file if it ran; a loader that ran the payload and raised
afterwards would still leave the marker, so the tests assert both the refusal and the absence of
the marker.
"""
import builtins
import os
import pickle

import numpy as np
import pytest
import torch

from reenact.data import format as fmt
from reenact.face3d import detectors, tddfa
from reenact.face3d.loading import load_model
from reenact.face3d.morphable import read_npz
from reenact.face3d.pipeline import load_parameters


class _Shell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


PAYLOADS = [_Shell, _Exec]


def _object_array(payload):
    array = np.empty(1, dtype=object)
    array[0] = payload
    return array


def _write(kind, path, payload):
    """A file of ``kind`` whose loading with pickles enabled would run ``payload``."""
    if kind == "pkl":
        path.write_bytes(pickle.dumps({"u": payload, "w_shp": np.zeros((3, 1))}))
    elif kind == "npy":
        np.save(path, _object_array(payload), allow_pickle=True)
    elif kind == "npz":
        np.savez(path, mean=_object_array(payload), alpha=_object_array(payload), landmarks=_object_array(payload))
    elif kind == "pth":
        torch.save({"state_dict": payload}, path)
    return path


LOADERS = [
    ("pkl", "evil.pkl", tddfa.safe_load_pickle),
    ("pkl", "bfm_noneck_v3.pkl", lambda p: load_model(p)),
    ("pkl", "param_mean_std_62d_120x120.pkl", tddfa.load_param_mean_std),
    ("npz", "model.npz", lambda p: load_model(p)),
    ("npz", "any.npz", lambda p: read_npz(p, "test file")),
    ("npz", "clip_params.npz", load_parameters),
    ("npz", "clip.npz", fmt.load_params),
    ("npy", "marks.npy", detectors.load_landmarks_file),
    ("npz", "marks.npz", detectors.load_landmarks_file),
    ("pth", "mb1_120x120.pth", tddfa.load_regressor),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.__name__)
@pytest.mark.parametrize("kind, name, loader", LOADERS, ids=[name for _, name, _ in LOADERS])
def test_loader_refuses_code_without_running_it(tmp_path, kind, name, loader, payload):
    marker = tmp_path / "payload-ran"
    path = _write(kind, tmp_path / name, payload(marker))
    if name == "bfm_noneck_v3.pkl":  # its loader reads the statistics file next to it first
        _write("pkl", tmp_path / "param_mean_std_62d_120x120.pkl", payload(marker))
    with pytest.raises(Exception) as info:
        loader(path)
    assert not marker.exists(), f"{name}: the payload ran before the loader refused it"
    # a one-line refusal of the user's file, not a crash from deep inside a library
    assert isinstance(info.value, (ValueError, RuntimeError, KeyError)), repr(info.value)
    assert "\n" not in str(info.value).strip() or kind == "pth"


def test_the_marker_payloads_do_run_when_unpickled(tmp_path):
    """The payloads are live: plain pickle runs them (so the absence of the marker means something)."""
    for number, payload in enumerate(PAYLOADS):
        marker = tmp_path / f"ran-{number}"
        pickle.loads(pickle.dumps(payload(marker)))
        assert marker.exists()
