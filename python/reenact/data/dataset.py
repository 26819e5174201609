"""A prepared dataset opened for training: its clips, verified, with broken ones skipped and logged.

Both loaders (DALI and the PyTorch fallback) open the dataset through :class:`ClipDataset`, so
they see the same clips in the same order and skip the same broken ones.
"""
import dataclasses
import logging
import os
import pathlib

import numpy as np

from . import format as fmt
from .video import FrameIndex, MediaError, probe

log = logging.getLogger("reenact.data")

#: Codecs DALI decodes on the CPU (``fn.decoders.video``, device="cpu").
DALI_CPU_CODECS = ("vp8", "vp9", "mjpeg")


@dataclasses.dataclass
class Clip:
    """One usable clip: its record, absolute paths and parameters (numpy, see FORMAT.md)."""

    record: fmt.ClipRecord
    video: pathlib.Path
    params: dict
    codec: str

    @property
    def frames(self):
        return self.record.frames


class SkipBudgetExceeded(fmt.DatasetError):
    """More clips (or files) were skipped than ``max_skip_fraction`` allows."""


def check_skip_fraction(skipped, total, max_skip_fraction, what="clips"):
    """Raise SkipBudgetExceeded (listing reasons) when skipped/total exceeds the budget."""
    if not (0.0 <= max_skip_fraction <= 1.0):
        raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction!r}")
    if total and len(skipped) / total > max_skip_fraction:
        details = "; ".join(f"{name}: {reason}" for name, reason in skipped[:10])
        raise SkipBudgetExceeded(
            f"{len(skipped)} of {total} {what} were skipped ({len(skipped) / total:.0%}), more than "
            f"max_skip_fraction={max_skip_fraction:.0%}: {details}")


def check_parameter_sizes(clips, face_model):
    """DatasetError unless every clip's identity and expression coefficients fit ``face_model``
    (a clip fitted with another model would fail only at the first training step)."""
    for clip in clips:
        ids, expressions = clip.params["alpha"].shape[0], clip.params["beta"].shape[1]
        if (ids, expressions) != (face_model.num_id, face_model.num_exp):
            raise fmt.DatasetError(
                f"{clip.record.params}: {ids} identity and {expressions} expression coefficients, but the face "
                f"model {face_model.name!r} has {face_model.num_id} and {face_model.num_exp}")


class ClipDataset:
    """The usable clips of a prepared dataset.

    Every clip is checked once, without decoding: its paths stay inside the dataset, its
    parameter file validates and matches the manifest's frame count, its video opens, has a
    video stream and holds at least as many frames (packets) as the manifest says, and (when
    ``codecs`` is given) its codec is one of them. A clip that fails is skipped with a logged
    reason (``self.skipped``); the run fails loudly when more than ``max_skip_fraction`` of the
    clips are skipped.

    Args:
        root: dataset directory (with manifest.jsonl).
        codecs: allowed codec names, e.g. :data:`DALI_CPU_CODECS`; None allows any.
        min_frames: clips with fewer valid frames (parameter ``valid``) are skipped (a pair
            needs 2 frames; the pair sampler draws valid frames only).
    """

    def __init__(self, root, codecs=None, min_frames=2, max_skip_fraction=0.1):
        self.root = pathlib.Path(os.fspath(root))
        records = fmt.read_manifest(self.root)
        if not records:
            raise fmt.DatasetError(f"{self.root / fmt.MANIFEST_NAME} lists no clips")
        self.clips, self.skipped = [], []
        for record in records:
            try:
                self.clips.append(self._open(record, codecs, min_frames))
            except (fmt.DatasetError, MediaError) as err:
                log.warning("skipping clip %s: %s", record.clip, err)
                self.skipped.append((record.clip, str(err)))
        check_skip_fraction(self.skipped, len(records), max_skip_fraction)
        if not self.clips:
            name, reason = self.skipped[0]
            raise fmt.DatasetError(f"no usable clip in {self.root} ({name}: {reason})")
        sizes = {clip.record.size for clip in self.clips}
        if len(sizes) > 1:
            raise fmt.DatasetError(f"clips of one dataset must share one size, found {sorted(sizes)}")
        self.size = sizes.pop()
        self._indices = {}

    def _open(self, record, codecs, min_frames):
        video = self._inside(record.clip)
        params = fmt.load_params(self._inside(record.params), frames=record.frames)
        if record.frames < min_frames:
            raise fmt.DatasetError(f"only {record.frames} frames; a pair needs {min_frames}")
        valid = int(np.count_nonzero(params["valid"]))
        if valid < min_frames:
            raise fmt.DatasetError(f"only {valid} of {record.frames} frames have a valid fit; a pair needs {min_frames}")
        packets, _, codec, width, height = probe(video)
        if packets < record.frames:
            raise MediaError(f"the manifest says {record.frames} frames but only {packets} are in {video.name}")
        if (width, height) != (record.size, record.size):
            raise MediaError(f"video is {width}x{height}, the manifest says {record.size}x{record.size}")
        if codecs is not None and codec not in codecs:
            raise MediaError(f"codec {codec} is not decodable here (allowed: {', '.join(codecs)})")
        return Clip(record, video, params, codec)

    def _inside(self, relative):
        """The file a manifest path names. The path itself must stay inside the dataset (no '..',
        not absolute); it may pass through symlinks inside the dataset that the dataset's owner
        made (``clips/`` on another disk is how large datasets are laid out), never through one
        planted by another user."""
        parts = pathlib.PurePosixPath(relative).parts
        if pathlib.PurePath(relative).is_absolute() or ".." in parts or not parts:
            raise fmt.DatasetError(f"path {relative!r} leaves the dataset directory")
        owner = self.root.stat().st_uid
        step = self.root
        for part in parts:
            step = step / part
            if step.is_symlink() and step.lstat().st_uid != owner:
                raise fmt.DatasetError(f"path {relative!r} passes through {step}, a symlink the dataset's owner "
                                       f"did not make")
        path = step.resolve()
        if not path.is_file():
            raise fmt.DatasetError(f"file not found: {path}")
        return path

    def __len__(self):
        return len(self.clips)

    @property
    def frame_counts(self):
        return np.array([clip.frames for clip in self.clips], dtype=np.int64)

    @property
    def valid_frames(self):
        """Per clip, the indices of the frames whose fit is valid (the frames pairs are drawn from)."""
        return [np.flatnonzero(clip.params["valid"]) for clip in self.clips]

    def frame_index(self, clip_id):
        """The cached :class:`FrameIndex` of a clip (built on first use, per process)."""
        if clip_id not in self._indices:
            self._indices[clip_id] = FrameIndex(self.clips[clip_id].video)
        return self._indices[clip_id]
