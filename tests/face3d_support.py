"""Shared helpers of the face3d tests: the built-in toy head and the real models of ../shared/data."""
from conftest import load_face_model
from reenact.face3d.morphable import model_from_arrays
from reenact.face3d.toy import make_toy_head

_cache = {}


def toy_model():
    if "toy" not in _cache:
        _cache["toy"] = make_toy_head()
    return _cache["toy"]


def sfm_model():
    """The Surrey Face Model (3448 vertices) from ../shared/data; skips the test when absent."""
    if "sfm" not in _cache:
        _cache["sfm"] = model_from_arrays(load_face_model("sfm_3448.npz"), name="sfm_3448")
    return _cache["sfm"]


def model_by_name(name):
    return toy_model() if name == "toy" else sfm_model()
