"""Inference: animate a source image with the pose and expression of a driving video.

- ``animation``: :func:`animate` (the library entry point; known parameters, no detector), the
  crop and paste-back geometry, :func:`side_by_side`;
- ``commands``: the ``reenact reenact`` subcommand (detection, fitting, video I/O).
"""
from .animation import (
    DEFAULT_CROP_SCALE,
    GEOMETRIC_FACE_MODEL,
    GEOMETRIC_RESOLUTION,
    OUTPUT_CODECS,
    POSE_MODES,
    ReenactedFrame,
    animate,
    feathered_mask,
    fill_missing,
    paste_back,
    pose_to_crop,
    side_by_side,
)

__all__ = [
    "DEFAULT_CROP_SCALE", "GEOMETRIC_FACE_MODEL", "GEOMETRIC_RESOLUTION", "OUTPUT_CODECS", "POSE_MODES",
    "ReenactedFrame", "animate", "feathered_mask", "fill_missing", "paste_back", "pose_to_crop", "side_by_side",
]
