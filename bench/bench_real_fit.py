"""Fits on real talking-head clips: identity plausibility, landmark accuracy, valid fraction.

Reads the clips of ../shared/data/real-videos (never part of the repository), finds mediapipe
landmarks once (cached in ``--cache``), cuts each video into clips the way ``reenact prepare``
does (runs of found frames, at most 150 frames, crops of 256 px) and fits every clip with one
shared identity. Rows: the fit before this work (prior per clip, squared loss, no offset
correction) and the calibrated MAP fit, measured in the same run. Calibration is cross-validated:
the offsets and threshold used for a video are estimated from the *other* videos only.

    python bench/bench_real_fit.py [--grid docs/real_fit_grid.png]
"""
import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

from reenact.data.prepare import _segments, crop_boxes, to_crop  # noqa: E402
from reenact.face3d import calibration  # noqa: E402
from reenact.face3d.detectors import MEDIAPIPE_TO_IBUG68  # noqa: E402
from reenact.face3d.fit import fit_landmarks, inter_ocular_distance  # noqa: E402
from reenact.face3d.morphable import load_model  # noqa: E402

SHARED = pathlib.Path(os.environ.get("PNCC_SHARED_DATA", ROOT.parent / "shared" / "data"))
VIDEOS = SHARED / "real-videos"
SFM_PATH = SHARED / "face-models" / "sfm_3448.npz"
INNER = slice(17, 68)
CROP = 256


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def video_landmarks(path, cache):
    """(T, 68, 2) mediapipe landmarks of a video (NaN where no face), cached as .npz."""
    cached = pathlib.Path(cache) / f"{path.stem}.npz"
    if not cached.exists():
        from reenact.data.video import iter_frames
        from reenact.face3d.detectors import MediapipeDetector

        dense = []
        with MediapipeDetector(video=True) as detector:
            for frame in iter_frames(path):
                points = detector.detect_dense(frame)
                dense.append(points if points is not None else np.full((478, 3), np.nan))
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cached, dense=np.array(dense))
    with np.load(cached) as data:
        return data["dense"][:, list(MEDIAPIPE_TO_IBUG68), :2]


def real_clips(cache, clip_length=150):
    """{video stem: [(first frame, crop landmarks (T, 68, 2)), ...]} as ``prepare`` cuts them."""
    clips = {}
    for path in sorted(VIDEOS.glob("*.mp4")):
        landmarks = video_landmarks(path, cache)
        found = np.isfinite(landmarks).all((1, 2))
        pieces = _segments(found, clip_length, 8)
        clips[path.stem] = [(first, to_crop(landmarks[first:stop], crop_boxes(landmarks[first:stop], 1.7, 2.0), CROP))
                            for first, stop in pieces]
    return {stem: pieces for stem, pieces in clips.items() if pieces}


def fit_clips(model, pieces, **options):
    """Fit each clip on its own identity; returns a list of FitResult."""
    return [fit_landmarks(model, torch.from_numpy(points), **options) for _, points in pieces]


def metrics(model, fits, pieces):
    alphas = torch.cat([f.clip_alpha for f in fits])
    norms = alphas.norm(dim=-1)
    inner = []
    for fit, (_, points) in zip(fits, pieces):
        iod = inter_ocular_distance(torch.from_numpy(points)).float()
        error = fit.residuals[:, INNER].norm(dim=-1).median(-1).values / iod
        inner.append(error)
    inner = torch.cat(inner)
    valid = torch.cat([f.ok for f in fits]).float()
    return {"clips": len(fits), "median_id_norm": float(norms.median()), "max_id_norm": float(norms.max()),
            "max_abs_coef": float(alphas.abs().max()),
            "median_inner_iod": float(inner.median()), "valid_fraction": float(valid.mean()),
            "frames": int(valid.numel())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="/tmp/pncc_real_landmarks")
    parser.add_argument("--grid", default=None, help="write a grid of P_d' renderings to this PNG")
    parser.add_argument("--json", default=str(ROOT / "bench" / "out" / "real_fit.json"))
    args = parser.parse_args()
    if not VIDEOS.is_dir() or not SFM_PATH.exists():
        sys.exit(f"needs {VIDEOS} and {SFM_PATH} (real clips and the SFM of ../shared/data)")
    torch.set_num_threads(1)
    model = load_model(SFM_PATH)
    clips = real_clips(args.cache)
    all_pieces = [piece for stem in clips for piece in clips[stem]]

    rows = {}
    before = [fit for stem in clips for fit in fit_clips(model, clips[stem], **calibration.LEGACY_FIT)]
    rows["before: prior per clip, squared loss, no offsets, threshold 0.08"] = metrics(model, before, all_pieces)
    robust = [fit for stem in clips for fit in fit_clips(model, clips[stem], **calibration.UNCALIBRATED_REAL_FIT)]
    rows["MAP per-frame prior + Huber, no offsets (uncalibrated defaults)"] = metrics(model, robust, all_pieces)
    after = []
    for stem in clips:  # leave-one-video-out calibration
        training = [points for other in clips if other != stem for _, points in clips[other]]
        calib = calibration.calibrate(model, training, detector="mediapipe")
        after += fit_clips(model, clips[stem], **calib.fit_options())
    rows["after: MAP per-frame prior, Huber, offsets + threshold (leave-one-video-out)"] = metrics(model, after, all_pieces)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
