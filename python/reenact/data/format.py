"""The prepared dataset format: ``manifest.jsonl`` plus one video and one ``.npz`` per clip.

See ``FORMAT.md`` next to this file for the description users read. This module is the one place
that writes and validates it; ``reenact prepare``, ``reenact synth`` and both loaders go through it.
"""
import dataclasses
import json
import os
import pathlib
import zipfile

import numpy as np

from .. import validation
from ..face3d.morphable import read_npz

#: Bumped whenever a field changes meaning; readers refuse versions they do not know.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.jsonl"

#: Limits of a manifest line's numbers (a clip is a face track of one video: an hour at 60 fps is
#: 216,000 frames; prepared crops are 256 px).
MAX_CLIP_FRAMES = 1_000_000
MAX_CLIP_SIZE = 4096
MIN_FPS, MAX_FPS = 0.1, 1000.0

#: Per-frame arrays of a clip's ``.npz`` (leading dimension T = frame count).
FRAME_KEYS = ("pose", "beta", "landmarks", "crop_box", "valid")
#: Per-clip arrays of a clip's ``.npz``.
CLIP_KEYS = ("alpha", "identity", "model_name", "image_size", "format_version")


class DatasetError(ValueError):
    """A prepared dataset (manifest, clip or parameter file) is missing or malformed."""


@dataclasses.dataclass
class ClipRecord:
    """One manifest line. Paths are relative to the dataset root (POSIX separators)."""

    clip: str
    params: str
    frames: int
    fps: float
    identity: str
    source: str
    codec: str
    size: int
    synthetic: bool = False
    format_version: int = FORMAT_VERSION

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, line, where="manifest"):
        """One manifest line -> ClipRecord; DatasetError naming ``where`` and the field otherwise."""
        try:
            data = validation.mapping(validation.parse_json(line, where), where)
            version = data.get("format_version")
            if version != FORMAT_VERSION or isinstance(version, bool):
                raise DatasetError(f"{where}: format_version {version!r} is not supported "
                                   f"(this reader knows version {FORMAT_VERSION})")
            names = {f.name for f in dataclasses.fields(cls)}
            missing = sorted(n for n in names if n not in data and n != "synthetic")
            if missing:
                raise DatasetError(f"{where}: missing fields {missing}")
            record = cls(**{k: v for k, v in data.items() if k in names})
            for name in ("clip", "params"):
                validation.relative_path(getattr(record, name), f"{where}: {name}")
            validation.integer(record.frames, f"{where}: frames", 1, MAX_CLIP_FRAMES)
            validation.integer(record.size, f"{where}: size", 1, MAX_CLIP_SIZE)
            validation.number(record.fps, f"{where}: fps", MIN_FPS, MAX_FPS)
            for name in ("identity", "source", "codec"):
                validation.string(getattr(record, name), f"{where}: {name}")
            if not isinstance(record.synthetic, bool):
                raise DatasetError(f"{where}: synthetic must be true or false, got {record.synthetic!r}")
        except validation.InputError as err:
            raise DatasetError(str(err)) from None
        return record


def read_manifest(root):
    """All records of ``root/manifest.jsonl``, in file order. Raises DatasetError naming the line
    (malformed, non-UTF-8 or over-long lines, and a clip listed twice, are refused)."""
    path = pathlib.Path(os.fspath(root)) / MANIFEST_NAME
    if not path.is_file():
        raise DatasetError(f"no {MANIFEST_NAME} in {root}: not a prepared dataset")
    records, lines_of = [], {}
    try:
        with open(path, "rb") as handle:
            for number, line in enumerate(_bounded_lines(handle, path), 1):
                if not line.strip():
                    continue
                record = ClipRecord.from_json(line, where=f"{path}:{number}")
                if record.clip in lines_of:
                    raise DatasetError(f"{path}:{number}: clip {record.clip!r} is listed twice "
                                       f"(also on line {lines_of[record.clip]})")
                lines_of[record.clip] = number
                records.append(record)
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror or err}") from None
    return records


def dataset_face_model(root):
    """The built-in face model ("toy" or "mediapipe") the first readable clip of a prepared dataset
    was fitted with; None for another model, without a manifest or without a readable parameter
    file. Commands use it as their default face model."""
    # Here, not at the top: data must not import face3d at import time (face3d's commands import data).
    from ..face3d.mediapipe_face import MEDIAPIPE_NAME
    from ..face3d.toy import TOY_NAME

    try:
        records = read_manifest(root)
    except DatasetError:
        return None
    for record in records:
        try:
            name = str(load_params(pathlib.Path(os.fspath(root)) / record.params)["model_name"])
        except (DatasetError, KeyError, OSError):
            continue
        return {TOY_NAME: "toy", MEDIAPIPE_NAME: "mediapipe"}.get(name)
    return None


def _bounded_lines(handle, path):
    """The file's lines (bytes), refusing one longer than MAX_MANIFEST_LINE_BYTES before it is read whole."""
    number = 0
    while True:
        line = handle.readline(validation.MAX_MANIFEST_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > validation.MAX_MANIFEST_LINE_BYTES:
            raise DatasetError(f"{path}:{number}: line longer than {validation.MAX_MANIFEST_LINE_BYTES} bytes")
        yield line


def append_manifest(root, record):
    """Append one record and flush it to disk (so an interrupted run keeps finished clips)."""
    path = pathlib.Path(os.fspath(root)) / MANIFEST_NAME
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(record.to_json() + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_manifest(root, records):
    """Write the whole manifest atomically (temporary file, then rename)."""
    path = pathlib.Path(os.fspath(root)) / MANIFEST_NAME
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(record.to_json() + "\n")
    os.replace(temporary, path)


def save_params(path, *, alpha, pose, beta, landmarks, crop_box, valid, identity, model_name, image_size):
    """Write a clip's parameter file atomically; validates shapes (T frames, Ki, Ke)."""
    arrays = {
        "alpha": np.asarray(alpha, dtype=np.float32), "pose": np.asarray(pose, dtype=np.float32),
        "beta": np.asarray(beta, dtype=np.float32), "landmarks": np.asarray(landmarks, dtype=np.float32),
        "crop_box": np.asarray(crop_box, dtype=np.float32), "valid": np.asarray(valid, dtype=bool),
        "identity": np.array(str(identity)), "model_name": np.array(str(model_name)),
        "image_size": np.array(int(image_size), dtype=np.int64),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
    }
    check_params(arrays, where=str(path))
    path = pathlib.Path(os.fspath(path))
    temporary = path.with_name(path.stem + ".tmp.npz")
    np.savez(temporary, **arrays)
    os.replace(temporary, path)


def check_params(arrays, where="params", frames=None):
    """Validate a parameter mapping; returns the frame count T. Raises DatasetError."""
    missing = [k for k in FRAME_KEYS + CLIP_KEYS if k not in arrays]
    if missing:
        raise DatasetError(f"{where}: missing arrays {missing}")
    for key, kinds, what in _KINDS:
        array = np.asarray(arrays[key])
        if array.dtype.kind not in kinds or (key in SCALAR_KEYS and array.shape != ()):
            raise DatasetError(f"{where}: {key} must be {what}, got {array.dtype} of shape {array.shape}")
    version = int(arrays["format_version"])
    if version != FORMAT_VERSION:
        raise DatasetError(f"{where}: format_version {version} is not supported (expected {FORMAT_VERSION})")
    if not 0 < int(arrays["image_size"]) <= MAX_CLIP_SIZE:
        raise DatasetError(f"{where}: image_size must be in [1, {MAX_CLIP_SIZE}], got {int(arrays['image_size'])}")
    pose, beta, alpha = arrays["pose"], arrays["beta"], arrays["alpha"]
    count = pose.shape[0] if pose.ndim == 3 else -1
    expected = {"pose": (count, 3, 4), "beta": (count, beta.shape[-1] if beta.ndim == 2 else -1),
                "landmarks": (count, 68, 2), "crop_box": (count, 4), "valid": (count,),
                "alpha": (alpha.shape[0] if alpha.ndim == 1 else -1,)}
    for key, shape in expected.items():
        if arrays[key].shape != shape or -1 in shape:
            raise DatasetError(f"{where}: {key} must have shape {_shape_text(key)}, got {arrays[key].shape}")
    if count < 1:
        raise DatasetError(f"{where}: a clip needs at least one frame")
    if frames is not None and count != frames:
        raise DatasetError(f"{where}: has {count} frames of parameters but the manifest says {frames}")
    for key in ("pose", "beta", "alpha"):
        if not np.isfinite(arrays[key]).all():
            raise DatasetError(f"{where}: {key} has NaN or infinite values")
    return count


SCALAR_KEYS = ("identity", "model_name", "image_size", "format_version")
#: (key, numpy dtype kinds it may have, what it must be): checked before any value is used.
_KINDS = tuple((key, "fiu", "a numeric array") for key in ("pose", "beta", "alpha", "landmarks", "crop_box")) + (
    ("valid", "b", "a boolean array"), ("identity", "U", "one string"), ("model_name", "U", "one string"),
    ("image_size", "iu", "one integer"), ("format_version", "iu", "one integer"))


def _shape_text(key):
    return {"pose": "(T, 3, 4)", "beta": "(T, Ke)", "landmarks": "(T, 68, 2)", "crop_box": "(T, 4)",
            "valid": "(T,)", "alpha": "(Ki,)"}[key]


def load_params(path, frames=None):
    """Read and validate a clip's ``.npz`` -> dict of numpy arrays (never unpickles)."""
    try:
        arrays = read_npz(path, "parameter")
    except (FileNotFoundError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DatasetError(str(err)) from None
    check_params(arrays, where=str(path), frames=frames)
    return arrays


# iBUG-68 index of each point's mirror image (left <-> right), used when a frame is flipped.
IBUG68_MIRROR = np.array(
    list(range(16, -1, -1))                                   # outline 0-16
    + list(range(26, 16, -1))                                 # brows 17-26
    + [27, 28, 29, 30] + [35, 34, 33, 32, 31]                 # nose
    + [45, 44, 43, 42, 47, 46] + [39, 38, 37, 36, 41, 40]     # eyes
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]        # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65]                        # inner lips
)


def mirror_params(pose, landmarks, width):
    """Parameters of a horizontally flipped frame (image x -> width - 1 - x).

    The flipped image shows the mirror image of the face, ``D @ mesh`` with D = diag(-1, 1, 1) in
    model space. The pose becomes ``[D A D | D t + (width - 1, 0, 0)]``, which is again a valid
    ``s * F @ R`` pose (``D R D`` is a proper rotation). Identity and expression coefficients are
    kept: that is exact for models whose bases are left-right symmetric (the toy head) and the
    usual approximation for others. Landmarks are mirrored and re-indexed (left eye <-> right eye).

    Args: pose (..., 3, 4), landmarks (..., 68, 2) numpy arrays; width in pixels.
    Returns: (pose, landmarks) new arrays.
    """
    mirror = np.array([-1.0, 1.0, 1.0], dtype=pose.dtype)
    pose = pose.copy()
    pose[..., :3] = mirror[:, None] * pose[..., :3] * mirror[None, :]
    pose[..., 0, 3] = (width - 1) - pose[..., 0, 3]
    landmarks = landmarks[..., IBUG68_MIRROR, :].copy()
    landmarks[..., 0] = (width - 1) - landmarks[..., 0]
    return pose, landmarks
