"""``load_model``: a face model by name or path. It sits above every model format (the toy head,
mediapipe, eos's SFM, 3DDFA_V2's BFM, the project's .npz), which import only :mod:`.morphable`."""
import os
import pathlib

from .eos_sfm import load_eos_sfm
from .mediapipe_face import make_mediapipe_model
from .morphable import MEDIAPIPE_MODEL, MorphableModel, load_npz_model
from .registry import resolve
from .tddfa import load_tddfa_bfm
from .toy import make_toy_head


def load_model(spec, **kwargs):
    """Load a model by name or path.

    ``"toy"`` gives the built-in synthetic head; ``"mediapipe"`` the built-in real face model
    (:mod:`reenact.face3d.mediapipe_face`, licence-free); a ``.npz`` path the project's format; a ``.pkl``
    path 3DDFA_V2's ``bfm_noneck_v3.pkl`` (see :func:`reenact.face3d.tddfa.load_tddfa_bfm`, whose
    keyword arguments pass through); a folder eos's Surrey Face Model files
    (:func:`reenact.face3d.eos_sfm.load_eos_sfm`); any other name an installed model
    (:mod:`reenact.face3d.registry`).
    """
    if isinstance(spec, MorphableModel):
        return spec
    text = os.fspath(resolve(spec))
    if text == "toy":
        return make_toy_head(**kwargs)
    if text == MEDIAPIPE_MODEL:
        return make_mediapipe_model(**kwargs)
    if pathlib.Path(text).is_dir():
        return load_eos_sfm(text, **kwargs)
    suffix = pathlib.Path(text).suffix.lower()
    if suffix == ".npz":
        return load_npz_model(text, **kwargs)
    if suffix == ".pkl":
        return load_tddfa_bfm(text, **kwargs)
    raise ValueError(f"unknown face model {text!r}: expected 'toy', 'mediapipe', a model name, a .npz, "
                     f"a 3DDFA_V2 .pkl or a folder of eos's Surrey Face Model files")
