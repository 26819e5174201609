"""Training pairs: which frames, which augmentation, which parameters. The one place that decides.

Both loaders call :func:`epoch_schedule` and :func:`batch_params`, so for the same seed they give
the same pairs, the same flips and the same colour jitter; they differ only in who decodes.

Per epoch every clip gives one pair. The clip order is a seeded permutation; it is padded (by
wrapping around) to a multiple of ``num_shards * batch_size`` so that every rank runs the same
number of full steps; padded samples are flagged ``pad``. Rank ``shard_id`` takes every
``num_shards``-th sample. A sample's frames and augmentation depend only on (seed, epoch, its
position in the padded order), never on the rank or the number of workers.

Only frames whose fit is valid (the parameter file's ``valid``) are drawn as source or driving:
the frame distance is drawn in positions of a clip's valid-frame list, so a clip whose frames are
all valid gives exactly the pairs it gave before ``valid`` was honoured.
"""
import dataclasses

import numpy as np

from ..validation import is_int
from .format import mirror_params


@dataclasses.dataclass(frozen=True)
class PairConfig:
    """Sampling and augmentation settings.

    min_gap, max_gap: frame distance between source and driving (clipped to the clip length).
    flip_prob: probability of a horizontal flip (both frames, parameters mirrored).
    gain_jitter: per-channel gain drawn from 1 +- gain_jitter (colour jitter; 0 disables).
    bias_jitter: brightness offset drawn from +- bias_jitter, in units of the [-1, 1] range.
    """

    min_gap: int = 1
    max_gap: int = 64
    flip_prob: float = 0.5
    gain_jitter: float = 0.1
    bias_jitter: float = 0.1

    def __post_init__(self):
        if not (isinstance(self.min_gap, int) and isinstance(self.max_gap, int) and 1 <= self.min_gap <= self.max_gap):
            raise ValueError(f"need integers 1 <= min_gap <= max_gap, got {self.min_gap}, {self.max_gap}")
        for name in ("flip_prob", "gain_jitter", "bias_jitter"):
            value = getattr(self, name)
            if not (0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")


#: No augmentation at all (evaluation, frame-accuracy tests).
NO_AUGMENTATION = PairConfig(flip_prob=0.0, gain_jitter=0.0, bias_jitter=0.0)


@dataclasses.dataclass(frozen=True)
class PairSpec:
    """One training sample: clip number, frame indices, augmentation, and whether it is padding."""

    clip: int
    source: int
    driving: int
    flip: bool
    gain: tuple
    bias: float
    pad: bool


def epoch_schedule(frame_counts, batch_size, seed, epoch=0, shard_id=0, num_shards=1, config=PairConfig(),
                   valid_frames=None):
    """This rank's samples for one epoch, grouped in full batches -> list of lists of PairSpec.

    ``valid_frames``: None (every frame may be drawn) or, per clip, the sorted indices of its
    valid frames (at least 2 each); source and driving are drawn from them only.
    """
    frame_counts = np.asarray(frame_counts, dtype=np.int64)
    for name, value in (("batch_size", batch_size), ("num_shards", num_shards)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not is_int(shard_id) or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be an int in [0, {num_shards}), got {shard_id!r}")
    if frame_counts.ndim != 1 or frame_counts.size == 0 or frame_counts.min() < 2:
        raise ValueError("frame_counts must list at least one clip, each with >= 2 frames")
    valid_frames = _check_valid_frames(valid_frames, frame_counts)
    order = np.random.default_rng([seed, epoch]).permutation(frame_counts.size)
    per_step = batch_size * num_shards
    total = -(-order.size // per_step) * per_step
    padded = np.resize(order, total)
    specs = [_spec(int(clip), valid_frames[clip], seed, epoch, position, position >= order.size, config)
             for position, clip in enumerate(padded) if position % num_shards == shard_id]
    return [specs[i:i + batch_size] for i in range(0, len(specs), batch_size)]


def _check_valid_frames(valid_frames, frame_counts):
    """Per clip, an int64 array of the frames that may be drawn (all when ``valid_frames`` is None)."""
    if valid_frames is None:
        return [np.arange(count) for count in frame_counts]
    if len(valid_frames) != len(frame_counts):
        raise ValueError(f"valid_frames lists {len(valid_frames)} clips, frame_counts {len(frame_counts)}")
    checked = []
    for clip, (frames, count) in enumerate(zip(valid_frames, frame_counts)):
        frames = np.asarray(frames, dtype=np.int64)
        if frames.ndim != 1 or frames.size < 2 or frames.min() < 0 or frames.max() >= count \
                or (np.diff(frames) <= 0).any():
            raise ValueError(f"valid_frames of clip {clip} must be >= 2 increasing indices below {count}")
        checked.append(frames)
    return checked


def _spec(clip, valid, seed, epoch, position, pad, config):
    rng = np.random.default_rng([seed, epoch, position, 1])
    frames = len(valid)
    gap = int(rng.integers(min(config.min_gap, frames - 1), min(config.max_gap, frames - 1) + 1))
    first = int(rng.integers(0, frames - gap))
    source, driving = (first, first + gap) if rng.random() < 0.5 else (first + gap, first)
    source, driving = int(valid[source]), int(valid[driving])
    flip = bool(rng.random() < config.flip_prob)
    gain = tuple(float(g) for g in 1.0 + rng.uniform(-config.gain_jitter, config.gain_jitter, 3))
    bias = float(rng.uniform(-config.bias_jitter, config.bias_jitter))
    return PairSpec(clip, source, driving, flip, gain, bias, bool(pad))


def replacement(spec, frame_counts, valid_frames=None):
    """The pair that stands in for ``spec`` when its clip fails to decode at run time: the next
    clip, the same frame positions clipped to its length (to its valid frames, when given),
    flagged ``pad``. Both loaders use it, so they stay identical even then."""
    following = (spec.clip + 1) % len(frame_counts)
    frames = _check_valid_frames(valid_frames, np.asarray(frame_counts))[following]
    first_at_or_after = [int(frames[min(np.searchsorted(frames, f), len(frames) - 1)]) for f in (spec.source, spec.driving)]
    return dataclasses.replace(spec, clip=following, source=first_at_or_after[0], driving=first_at_or_after[1], pad=True)


def normalisation(spec):
    """Per-channel (mean, std) float32 (3,) with ``out = (pixel - mean) / std``.

    That is ``gain * (pixel / 127.5 - 1) + bias``: [-1, 1] normalisation plus the colour jitter,
    in the form of DALI's ``crop_mirror_normalize``. Outputs are then clamped to [-1, 1].
    """
    gain = np.asarray(spec.gain, dtype=np.float64)
    std = 127.5 / gain
    mean = 127.5 * (1.0 - spec.bias / gain)
    return mean.astype(np.float32), std.astype(np.float32)


def batch_params(clips, specs):
    """Parameters of a batch of pairs, flips applied -> dict of numpy arrays.

    Keys: alpha (B, Ki); pose_source, pose_driving (B, 3, 4); beta_source, beta_driving (B, Ke);
    landmarks_source, landmarks_driving (B, 68, 2); clip, frame_source, frame_driving (B,) int64;
    flip, pad (B,) bool. ``clips`` is the list of :class:`~reenact.data.dataset.Clip`.
    """
    out = {key: [] for key in ("alpha", "pose_source", "pose_driving", "beta_source", "beta_driving",
                               "landmarks_source", "landmarks_driving")}
    for spec in specs:
        params = clips[spec.clip].params
        out["alpha"].append(params["alpha"])
        for role, frame in (("source", spec.source), ("driving", spec.driving)):
            pose, landmarks = params["pose"][frame], params["landmarks"][frame]
            if spec.flip:
                pose, landmarks = mirror_params(pose, landmarks, clips[spec.clip].record.size)
            out[f"pose_{role}"].append(pose)
            out[f"landmarks_{role}"].append(landmarks)
            out[f"beta_{role}"].append(params["beta"][frame])
    batch = {key: np.stack(values).astype(np.float32) for key, values in out.items()}
    batch["clip"] = np.array([s.clip for s in specs], dtype=np.int64)
    batch["frame_source"] = np.array([s.source for s in specs], dtype=np.int64)
    batch["frame_driving"] = np.array([s.driving for s in specs], dtype=np.int64)
    batch["flip"] = np.array([s.flip for s in specs], dtype=bool)
    batch["pad"] = np.array([s.pad for s in specs], dtype=bool)
    return batch


#: Keys of :func:`batch_params` that are float parameter arrays (moved to the training device).
PARAM_KEYS = ("alpha", "pose_source", "pose_driving", "beta_source", "beta_driving",
              "landmarks_source", "landmarks_driving")
