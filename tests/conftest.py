"""Shared fixtures: devices, the real face meshes of ../shared/data, thread-count control."""
import os
import pathlib

import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Test the checkout itself when its extension has been built in place (`setup.py build_ext
# --inplace` or an editable install), rather than whatever copy happens to be installed.
if any((REPO / "pncc_cuda").glob("_C*.so")):
    sys.path[:0] = [str(REPO), str(REPO / "python")]

import torch  # noqa: E402
FACE_MODELS = pathlib.Path(
    os.environ.get("PNCC_SHARED_DATA", REPO.parent / "shared" / "data")
) / "face-models"


def cuda_available():
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    # Queried lazily here, never at import time of a test module.
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible")
    for item in items:
        # The mark itself, not `"cuda" in item.keywords`: keywords hold the names of the test's
        # folders too, so a checkout in a directory named "cuda" skipped every test.
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def devices():
    """Parametrisation over devices: CUDA entries carry the `cuda` mark and skip without a GPU."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def load_face_model(name):
    """Load an .npz of ../shared/data/face-models, or skip with the reason it is unavailable."""
    path = FACE_MODELS / name
    if not path.exists():
        pytest.skip(f"real face meshes not available: {path} is absent (set PNCC_SHARED_DATA)")
    return dict(np.load(path, allow_pickle=False))


@pytest.fixture
def num_threads():
    """Run a block with a given intra-op thread count, restoring the previous count afterwards."""
    previous = torch.get_num_threads()

    class _Threads:
        def __call__(self, n):
            torch.set_num_threads(n)
            return self

    yield _Threads()
    torch.set_num_threads(previous)


@pytest.fixture
def corr_path_mode():
    """Sets corr_warp's CPU path mode (csrc/corr/corr_cpu_path.h) for one test; restores the
    previous one afterwards. Yields the debug op: mode -> the previous mode ("" only reads it)."""
    previous = torch.ops.pncc._corr_cpu_path_mode("")
    yield torch.ops.pncc._corr_cpu_path_mode
    torch.ops.pncc._corr_cpu_path_mode(previous)
