"""Synthetic inputs for the model tests: ellipsoid "faces" whose colour is a function of PNCC.

The PNCC of a face is the normalised (u, v, depth) position on an ellipsoid centred at a given
place; the image paints a fixed texture over (u, v). A driving frame moves the face, so the
ground truth is a pure warp of the source: the task a correspondence can learn.
"""
import pytest
import torch

from reenact.model.testing import synthetic_batch, synthetic_face  # noqa: F401  (re-exported to the tests)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run a model test module on one intra-op thread, then restore the thread count.

    The model tests check wiring and maths, not threading (test_corr covers thread counts). On a
    shared machine whose cores are oversubscribed, every OpenMP barrier of a multi-threaded step
    waits for a descheduled thread: the suite measured 165 s with 2 threads, 16 s with 1.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
