"""Image and video reconstruction: read, detect landmarks, fit. Used by ``reenact pncc``.

Faceless inputs give a result with ``found=False`` and a message; they never reach the fitter.
"""
import dataclasses
import os
import pathlib

import numpy as np
import torch

from ..validation import open_image
from .detectors import check_image
from .fit import fit_landmarks
from .morphable import read_npz

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


def read_image(path):
    """Read an image file as (H, W, 3) uint8 RGB; clear FileNotFoundError/ValueError otherwise.
    Its header's size is checked before the pixels are decoded (:func:`reenact.validation.open_image`)."""
    try:
        from PIL import Image  # noqa: F401
    except ImportError as err:
        raise ImportError("reading images needs Pillow (`pip install pillow`)") from err

    return open_image(path)


def video_frames(path):
    """Yield (H, W, 3) uint8 RGB frames of a video, and report its frame count (or None) first.

    Returns (count, iterator). Raises ValueError when the file cannot be opened as a video.
    """
    path = pathlib.Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    try:
        import cv2  # optional dependency (OpenCV): only videos need it
    except ImportError as err:
        raise ImportError("reading videos needs OpenCV (`pip install opencv-python`, or mediapipe's "
                          "opencv-contrib-python)") from err
    capture = cv2.VideoCapture(os.fspath(path))
    if not capture.isOpened():
        raise ValueError(f"cannot open video {path}")
    ok, first = capture.read()
    if not ok or first is None:
        capture.release()
        raise ValueError(f"cannot read any frame from video {path}")
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None

    def frames():
        try:
            frame = first
            while frame is not None:
                yield np.ascontiguousarray(frame[..., ::-1])
                ok, frame = capture.read()
                if not ok:
                    break
        finally:
            capture.release()

    return count, frames()


@dataclasses.dataclass
class Reconstruction:
    """Result for a sequence of frames (one for an image).

    found: (N,) bool, a face was detected; landmarks (N, 68, 2) NaN where not found;
    fit: FitResult over the found frames only (None when none was found); message: summary.
    """

    found: np.ndarray
    landmarks: np.ndarray
    fit: object
    message: str


def reconstruct(frames, model, detector, share_identity=True, progress=None, **fit_options):
    """Detect and fit every frame; all found frames share one identity when ``share_identity``.

    Args:
        frames: iterable of (H, W, 3) uint8 RGB images.
        model: MorphableModel; detector: a LandmarkDetector.
        progress: optional callable called once per frame (e.g. a progress bar's ``update``).
        fit_options: passed to :func:`~reenact.face3d.fit.fit_landmarks`.
    """
    dense_model = getattr(model, "dense", False)
    landmarks, confidence, found, dense = [], [], [], []
    for index, frame in enumerate(frames):
        check_image(frame, f"frame {index}")
        detection = detector.detect(frame)
        if detection is not None and dense_model:
            if detection.dense is None:
                raise ValueError(f"the {model.name!r} model is fitted to mediapipe's dense face mesh; "
                                 f"the {detector.name!r} detector gives only 68 landmarks (use --detector mediapipe)")
            dense.append(detection.dense)
        found.append(detection is not None)
        landmarks.append(detection.landmarks if detection else np.full((68, 2), np.nan))
        confidence.append(detection.confidence if detection else np.zeros(68))
        if progress is not None:
            progress()
    found = np.array(found, dtype=bool)
    landmarks = np.array(landmarks).reshape(-1, 68, 2)
    if not found.any():
        what = "the image" if len(found) == 1 else f"any of {len(found)} frames"
        return Reconstruction(found, landmarks, None, f"no face found in {what}")
    chosen = torch.from_numpy(np.flatnonzero(found))
    clip_index = None if share_identity else torch.arange(len(chosen))
    if dense_model:
        fit = model.fit_dense(np.stack(dense), clip_index)
    else:
        fit = fit_landmarks(model, torch.from_numpy(landmarks[found]),
                            torch.from_numpy(np.array(confidence)[found]), clip_index, **fit_options)
    message = f"face found in {int(found.sum())} of {len(found)} frame(s); {int(fit.ok.sum())} fitted well"
    return Reconstruction(found, landmarks, fit, message)


def load_parameters(path):
    """Precomputed parameters: the ``*_params.npz`` that ``reenact pncc`` writes (or any .npz with
    ``alpha`` (N, Ki), ``beta`` (N, Ke) and ``pose`` (N, 3, 4)) -> dict of float32 tensors.

    This is the third reconstruction backend next to landmark fitting and the 3DDFA_V2 regressor.
    """
    arrays = read_npz(path, "parameter")
    missing = [key for key in ("alpha", "beta", "pose") if key not in arrays]
    if missing:
        raise ValueError(f"parameter file {path} lacks {missing}")
    out = {key: torch.from_numpy(np.asarray(arrays[key], dtype=np.float32)) for key in ("alpha", "beta", "pose")}
    if out["pose"].ndim != 3 or out["pose"].shape[1:] != (3, 4):
        raise ValueError(f"pose in {path} must be (N, 3, 4), got {tuple(out['pose'].shape)}")
    return out
