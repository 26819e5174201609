"""Which face models exist, where they are installed, and under which licence.

Two models are built in: the synthetic toy head and the licence-free ``mediapipe`` real face model
(:mod:`reenact.face3d.mediapipe_face`). The 3DMMs are never shipped with the package: the user
downloads them from their public sources (README, "Face models") into a model folder:

- ``$REENACT_MODELS`` (one or more folders, separated like PATH), else
- ``~/.local/share/reenact/models``.

A model is installed as ``<folder>/<name>/`` (eos's files for the SFM), ``<folder>/<name>.npz``
(the project's format) or ``<folder>/<name>.pkl`` (3DDFA_V2's BFM). ``--model`` takes a name
from :data:`KNOWN_MODELS` (the built-in ones included), or a path to any of these.
"""
import dataclasses
import os
import pathlib

from .eos_sfm import EOS_FILES


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    licence: str
    source: str


KNOWN_MODELS = {
    "toy": ModelInfo("toy", "synthetic toy head built into the package (not a real face)",
                     "part of this project (no third-party terms)", "built in"),
    "mediapipe": ModelInfo("mediapipe", "real face model from mediapipe's 478-point face mesh (built in; "
                           "identity, expression residual and pose, no 3DMM basis)",
                           "Apache-2.0 (mediapipe 0.10.21's face mesh topology; mean shape measured "
                           "by this project)", "built in"),
    "sfm_3448": ModelInfo("sfm_3448", "Surrey Face Model, 3448 vertices, 63 identity + 6 expression",
                          "Surrey Face Model licence: free for non-commercial use only",
                          "https://github.com/patrikhuber/eos (share/)"),
    "bfm_noneck_v3": ModelInfo("bfm_noneck_v3", "Basel Face Model 2009 as cut by 3DDFA_V2, 38365 vertices",
                               "Basel Face Model 2009 licence: academic, non-commercial use only",
                               "https://github.com/cleardusk/3DDFA_V2 (configs/bfm_noneck_v3.pkl)"),
}
MODEL_SUFFIXES = (".npz", ".pkl")
BUILT_IN = ("toy", "mediapipe")


def model_dirs():
    """Folders searched for installed models, in order."""
    configured = os.environ.get("REENACT_MODELS")
    if configured:
        return [pathlib.Path(p).expanduser() for p in configured.split(os.pathsep) if p]
    return [pathlib.Path.home() / ".local" / "share" / "reenact" / "models"]


def _is_eos_folder(path):
    return path.is_dir() and all((path / f).is_file() for f in EOS_FILES)


def find_model(name):
    """The installed path of a model name, or None."""
    for folder in model_dirs():
        if _is_eos_folder(folder / name):
            return folder / name
        for suffix in MODEL_SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def installed_models():
    """[(ModelInfo, path or None)] of every known model and every other model file found."""
    rows = [(KNOWN_MODELS[name], None) for name in BUILT_IN]
    seen = set(BUILT_IN)
    for name, info in KNOWN_MODELS.items():
        if name not in BUILT_IN:
            rows.append((info, find_model(name)))
            seen.add(name)
    for folder in model_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            name = path.stem if path.suffix in MODEL_SUFFIXES else path.name
            if name in seen or not (path.suffix in MODEL_SUFFIXES or _is_eos_folder(path)):
                continue
            seen.add(name)
            rows.append((ModelInfo(name, "user-supplied model", "unknown: check where it came from", str(path)), path))
    return rows


def resolve(spec):
    """``--model`` value -> a built-in name or a path that exists; FileNotFoundError saying how to
    install."""
    text = os.fspath(spec)
    if text in BUILT_IN:
        return text
    path = pathlib.Path(text).expanduser()
    if path.exists():
        return path
    found = find_model(text)
    if found is not None:
        return found
    where = ", ".join(str(d) for d in model_dirs())
    if text in KNOWN_MODELS:
        raise FileNotFoundError(f"face model {text!r} is not installed (looked in {where}); get it from "
                                f"{KNOWN_MODELS[text].source} as the README's 'Face models' section says")
    raise FileNotFoundError(f"face model {text!r} is neither a file, a folder nor an installed model "
                            f"(known: {', '.join(KNOWN_MODELS)}; looked in {where})")
