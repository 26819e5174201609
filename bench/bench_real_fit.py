"""Fits on real talking-head clips: identity plausibility, landmark accuracy, valid fraction.

Reads the clips of ../shared/data/real-videos (never part of the repository), finds mediapipe
landmarks once (cached in ``--cache``), cuts each video into clips the way ``reenact prepare``
does (runs of found frames, at most 150 frames, crops of 256 px) and fits every clip with one
shared identity. Rows: the fit before this work (prior per clip, squared loss, no offset
correction) and the calibrated MAP fit, measured in the same run. Calibration is cross-validated:
the offsets and threshold used for a video are estimated from the other half of the videos
(two folds; a leave-one-video-out run costs 4x more on the 2-core machines).

    python bench/bench_real_fit.py [--grid docs/real_fit_grid.jpg] [--write-calibration]
"""
import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

from _common import cpu_model  # noqa: E402  (bench/, the script's directory)
from reenact.data.framing import crop_boxes, to_crop  # noqa: E402
from reenact.data.prepare_worker import _segments  # noqa: E402
from reenact.face3d import calibration  # noqa: E402
from reenact.face3d.detectors import MEDIAPIPE_TO_IBUG68  # noqa: E402
from reenact.face3d.fit import fit_landmarks, inter_ocular_distance  # noqa: E402
from reenact.face3d.loading import load_model  # noqa: E402

SHARED = pathlib.Path(os.environ.get("PNCC_SHARED_DATA", ROOT.parent / "shared" / "data"))
VIDEOS = SHARED / "real-videos"
SFM_PATH = SHARED / "face-models" / "sfm_3448.npz"
INNER = slice(17, 68)
CROP = 256


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


def calibration_clips(pieces, step=4):
    """Every ``step``-th frame of each clip: consecutive frames repeat each other's errors, and
    the calibration's cost is linear in frames."""
    return [points[::step] for _, points in pieces]


def grid(model, stems, clips, fits_before, fits_after, path, cache):
    """One row per video: the crop, P_d' (identity with that frame's expression and pose) before
    and after, and the clip's identity (neutral, 3/4 view) before and after."""
    from PIL import Image

    from reenact.data.framing import crop_frame
    from reenact.data.video import iter_frames
    from reenact.face3d.pncc import reconstruct_pncc
    from reenact.face3d.pose import compose_pose, euler_to_matrix
    from reenact.face3d.visualize import pncc_to_uint8

    tile = 192
    side_pose = compose_pose(euler_to_matrix(40.0, 0.0, 0.0).float(), torch.tensor(1.15),
                             torch.tensor([128.0, 120.0, 0.0]))[None]
    rows = []
    for stem, before, after in zip(stems, fits_before, fits_after):
        first, points = clips[stem][0]
        frame_number = len(points) // 2
        raw = video_landmarks(VIDEOS / f"{stem}.mp4", cache)
        stop = first + len(points)
        boxes = crop_boxes(raw[first:stop], 1.7, 2.0)
        image = next(f for i, f in enumerate(iter_frames(VIDEOS / f"{stem}.mp4")) if i == first + frame_number)
        tiles = [crop_frame(image, boxes[frame_number], CROP)]
        for fit in (before, after):
            pncc, _ = reconstruct_pncc(model, fit.clip_alpha[:1], fit.beta[frame_number:frame_number + 1],
                                       fit.pose[frame_number:frame_number + 1], size=CROP)
            tiles.append(pncc_to_uint8(pncc[0]))
        for fit in (before, after):
            pncc, _ = reconstruct_pncc(model, fit.clip_alpha[:1], None, side_pose, size=CROP)
            tiles.append(pncc_to_uint8(pncc[0]))
        rows.append(np.concatenate([np.asarray(Image.fromarray(t).resize((tile, tile))) for t in tiles], 1))
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="/tmp/pncc_real_landmarks")
    parser.add_argument("--grid", default=None, help="write a grid of P_d' renderings to this PNG")
    parser.add_argument("--json", default=str(ROOT / "bench" / "out" / "real_fit.json"))
    parser.add_argument("--write-calibration", action="store_true",
                        help="also calibrate on all clips and write the shipped calibration file")
    args = parser.parse_args()
    if not VIDEOS.is_dir() or not SFM_PATH.exists():
        sys.exit(f"needs {VIDEOS} and {SFM_PATH} (real clips and the SFM of ../shared/data)")
    torch.set_num_threads(1)
    model = load_model(SFM_PATH)
    clips = real_clips(args.cache)
    stems = sorted(clips)
    all_pieces = [piece for stem in stems for piece in clips[stem]]

    rows, timings = {}, {}
    started = time.perf_counter()
    before = [fit for stem in stems for fit in fit_clips(model, clips[stem], **calibration.LEGACY_FIT)]
    timings["before"] = time.perf_counter() - started
    rows["before: one prior per clip, squared loss, no offsets, threshold 0.08"] = metrics(model, before, all_pieces)
    started = time.perf_counter()
    robust = [fit for stem in stems for fit in fit_clips(model, clips[stem], **calibration.UNCALIBRATED_REAL_FIT)]
    timings["robust"] = time.perf_counter() - started
    rows["prior per frame + Huber, no offsets, threshold 0.08 (UNCALIBRATED_REAL_FIT)"] = metrics(model, robust, all_pieces)
    # Two-fold cross-validation by video: each half is fitted with the other half's calibration.
    halves = [stems[0::2], stems[1::2]]
    after, thresholds = {}, []
    for held_out, training in ((halves[0], halves[1]), (halves[1], halves[0])):
        calib = calibration.calibrate(model, calibration_clips([p for s in training for p in clips[s]]),
                                      detector="mediapipe", rounds=3)
        thresholds.append(calib.quality_threshold)
        for stem in held_out:
            after[stem] = fit_clips(model, clips[stem], **calib.fit_options())
    after = [fit for stem in stems for fit in after[stem]]
    rows["calibrated: offsets, sigma and threshold from the other half of the videos (2-fold)"] = metrics(
        model, after, all_pieces)
    shipped = calibration.load_calibration(model.name, "mediapipe")
    if shipped is not None:
        in_sample = [fit for stem in stems for fit in fit_clips(model, clips[stem], **shipped.fit_options())]
        rows["calibrated: the shipped calibration (made from all these clips)"] = metrics(model, in_sample, all_pieces)
    if args.write_calibration:
        calib = calibration.calibrate(model, calibration_clips(all_pieces), detector="mediapipe", rounds=3,
                                      note=f"mediapipe face mesh on {len(all_pieces)} clips of {', '.join(stems)} "
                                           f"(../shared/data/real-videos), every 4th frame, 256-px crops as prepare "
                                           f"makes them; written by bench/bench_real_fit.py --write-calibration")
        calibration.calibration_path(model.name, "mediapipe").write_text(calib.to_json() + "\n", encoding="utf-8")
    per_video = {stem: {"clips": len(clips[stem]), "frames": int(sum(len(p) for _, p in clips[stem]))} for stem in stems}
    result = {"cpu": cpu_model(), "rows": rows, "fold_thresholds": thresholds, "videos": per_video,
              "seconds_per_frame": {k: v / sum(len(p) for _, p in all_pieces) for k, v in timings.items()}}
    print(json.dumps(result, indent=1))
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    if args.grid:
        owners = [stem for stem in stems for _ in clips[stem]]  # the video of each fit, in order
        first = [owners.index(stem) for stem in stems]  # each video's first clip
        grid(model, stems, clips, [before[i] for i in first], [after[i] for i in first], args.grid, args.cache)


if __name__ == "__main__":
    main()
