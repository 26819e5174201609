"""Where ``reenact prepare`` spends its time on real 512x512 H.264 input, and its throughput.

Profile (one process, one thread): each stage of ``process_file`` timed on its own over one real
clip of ../shared/data/real-videos (default d11.mp4, 512x512, 225 frames): decode (both passes),
detect (mediapipe face mesh, video mode), fit (the calibrated SFM fit), crop and encode (VP9).
Throughput: ``process_file`` end to end in one worker, the way ``prepare`` runs it, in input
frames per second per core; ``--baseline`` also runs the previous version's per-stage settings in
the same process (interleaved, median of ``--repeats``) for the ratio.

    python bench/bench_prepare.py [--video d11.mp4] [--repeats 3]
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

from bench_real_fit import cpu_model  # noqa: E402
from reenact.data import prepare as prep  # noqa: E402
from reenact.data.video import encode_video, iter_frames  # noqa: E402
from reenact.face3d.calibration import fit_options_for  # noqa: E402
from reenact.face3d.detectors import make_detector  # noqa: E402
from reenact.face3d.fit import fit_landmarks  # noqa: E402
from reenact.face3d.morphable import load_model  # noqa: E402

SHARED = pathlib.Path(os.environ.get("PNCC_SHARED_DATA", ROOT.parent / "shared" / "data"))


def profile(path, model, options):
    """Seconds per stage for one file, and its frame count."""
    seconds = {}
    started = time.perf_counter()
    frames = list(iter_frames(path))
    seconds["decode (x2: both passes)"] = 2 * (time.perf_counter() - started)
    detector = make_detector("mediapipe", video=True)
    started = time.perf_counter()
    landmarks = []
    for frame in frames:
        found = detector.detect(frame)
        landmarks.append(found.landmarks if found is not None else np.full((68, 2), np.nan))
    seconds["detect"] = time.perf_counter() - started
    detector.close()
    landmarks = np.array(landmarks)
    found = np.isfinite(landmarks).all((1, 2))
    pieces = prep._segments(found, options.clip_length, options.min_clip_length)
    fit_options = fit_options_for(model, "mediapipe")
    started = time.perf_counter()
    plans = []
    for first, stop in pieces:
        boxes = prep.crop_boxes(landmarks[first:stop], options.crop_scale, options.smooth_sigma)
        points = prep.to_crop(landmarks[first:stop], boxes, options.size)
        fit_landmarks(model, torch.from_numpy(points), **fit_options)
        plans.append((first, stop, boxes))
    seconds["fit"] = time.perf_counter() - started
    started = time.perf_counter()
    crops = [[prep.crop_frame(frames[first + k], boxes[k], options.size) for k in range(stop - first)]
             for first, stop, boxes in plans]
    seconds["crop"] = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        for number, clip in enumerate(crops):
            encode_video(pathlib.Path(work) / f"{number}.webm", np.stack(clip), codec=options.codec)
        seconds["encode"] = time.perf_counter() - started
    return seconds, len(frames)


def end_to_end(path, model, options):
    """process_file in this process: input frames per second."""
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        _, frames, _ = prep.process_file(path, path.name, out, options, model=model)
        return frames / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default="d11.mp4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=str(ROOT / "bench" / "out" / "prepare.json"))
    args = parser.parse_args()
    path = SHARED / "real-videos" / args.video
    model_path = SHARED / "face-models" / "sfm_3448.npz"
    if not path.exists() or not model_path.exists():
        sys.exit(f"needs {path} and {model_path}")
    torch.set_num_threads(1)
    model = load_model(model_path)
    options = prep.PrepareOptions(model=str(model_path), size=256)
    split, frames = profile(path, model, options)
    total = sum(split.values())
    print(f"profile of {args.video} ({frames} frames, {cpu_model()}, 1 thread):")
    for stage, value in split.items():
        print(f"  {stage:26s} {1000 * value / frames:7.2f} ms/frame  {100 * value / total:5.1f}%")
    rates = [end_to_end(path, model, options) for _ in range(args.repeats)]
    print(f"process_file end to end: median {statistics.median(rates):.1f} input frames/s (one core)")
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "video": args.video, "frames": frames,
                                                   "ms_per_frame": {k: 1000 * v / frames for k, v in split.items()},
                                                   "frames_per_second": rates}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
