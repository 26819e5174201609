"""Where ``reenact prepare`` spends its time on real 512x512 H.264 input, and its throughput.

Profile (one process, one thread; CPU time of the process, so other load on the machine does not count): each stage of ``process_file`` timed on its own over one real
clip of ../shared/data/real-videos (default d11.mp4, 512x512, 225 frames): decode, detect
(mediapipe face mesh, video mode), fit (SFM), crop and encode (VP9).
Each stage is timed as it ran before issue 14 and as it runs now, interleaved in one process,
median of ``--repeats``.

End to end (``--against CHECKOUT``): one worker's work on the file, ``process_file`` of this
checkout and of another one (e.g. ``git archive c7352e0 python | tar -x -C /tmp/base``), each
in a fresh process that first imports what that checkout's fork server preloads, alternating for
``--repeats`` rounds; the CPU time of the call (it includes creating the detector and importing
what the preload lacks, as a worker does) and its wall time.

    python bench/bench_prepare.py [--video d11.mp4] [--repeats 3]
    python bench/bench_prepare.py --against /tmp/base [--repeats 3]
    python bench/bench_prepare.py --smoke     # one round (CI); says why and exits 0 without the data
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

from _common import cpu_model  # noqa: E402
from reenact.data import framing, prepare as prep, prepare_worker  # noqa: E402
from reenact.data.video import encode_video, iter_frames  # noqa: E402
from reenact.face3d.calibration import fit_options_for  # noqa: E402
from reenact.face3d.detectors import make_detector  # noqa: E402
from reenact.face3d.fit import fit_clip, fit_landmarks  # noqa: E402
from reenact.face3d.loading import load_model  # noqa: E402

SHARED = pathlib.Path(os.environ.get("PNCC_SHARED_DATA", ROOT.parent / "shared" / "data"))


def profile(path, model, options, legacy):
    """Seconds per stage for one file, and its frame count. ``legacy``: the stages as they were
    before issue 14 (exact colour conversion, two decoding passes, the joint fit with the old
    options); else as ``process_file`` runs them now."""
    seconds = {}
    started = time.process_time()
    frames = list(iter_frames(path, exact_colour=legacy))
    seconds["decode"] = (2 if legacy else 1) * (time.process_time() - started)
    detector = make_detector("mediapipe", video=True, dense=legacy)  # now: only the 68 points are read
    started = time.process_time()
    landmarks = []
    for frame in frames:
        found = detector.detect(frame)
        landmarks.append(found.landmarks if found is not None else np.full((68, 2), np.nan))
    seconds["detect"] = time.process_time() - started
    detector.close()
    landmarks = np.array(landmarks)
    found = np.isfinite(landmarks).all((1, 2))
    pieces = prepare_worker._segments(found, options.clip_length, options.min_clip_length)
    started = time.process_time()
    plans = []
    for first, stop in pieces:
        boxes = framing.crop_boxes(landmarks[first:stop], options.crop_scale, options.smooth_sigma)
        points = torch.from_numpy(framing.to_crop(landmarks[first:stop], boxes, options.size))
        if legacy:
            fit_landmarks(model, points)
        else:
            fit_clip(model, points, **fit_options_for(model, "mediapipe"))
        plans.append((first, stop, boxes))
    seconds["fit"] = time.process_time() - started
    started = time.process_time()
    crops = [[framing.crop_frame(frames[first + k], boxes[k], options.size) for k in range(stop - first)]
             for first, stop, boxes in plans]
    seconds["crop"] = time.process_time() - started
    with tempfile.TemporaryDirectory() as work:
        started = time.process_time()
        for number, clip in enumerate(crops):
            encode_video(pathlib.Path(work) / f"{number}.webm", np.stack(clip), codec=options.codec)
        seconds["encode"] = time.process_time() - started
    return seconds, len(frames)


# Run in a fresh process per checkout: argv = checkout, video, model, out folder.
_ONE_FILE = r"""
import importlib, inspect, json, pathlib, sys, time
sys.path[:0] = [sys.argv[1] + "/python"]
import torch
torch.set_num_threads(1)
from reenact.data import prepare as prep
preload = ["av", "reenact.face3d.fit", "reenact.face3d.detectors"]
if "mediapipe" in inspect.getsource(prep._worker_context):
    preload += ["mediapipe.python.solutions.face_mesh", "mediapipe.python.solutions.face_detection"]
for name in preload:
    importlib.import_module(name)
try:
    from reenact.face3d.loading import load_model
except ImportError:
    from reenact.face3d.morphable import load_model
model = load_model(sys.argv[3])
options = prep.PrepareOptions(model=sys.argv[3], size=256)
cpu, wall = time.process_time(), time.perf_counter()
result = prep.process_file(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[2]).name, sys.argv[4], options, model=model)
print(json.dumps({"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall, "frames": result[1],
                  "clips": len(result[0])}))
"""


def end_to_end(path, model_path, checkouts, repeats):
    """{checkout: [(input frames per CPU second, per wall second), ...]} from alternating runs."""
    rates = {checkout: [] for checkout in checkouts}
    for _ in range(repeats):
        for checkout in checkouts:
            with tempfile.TemporaryDirectory() as work:
                done = subprocess.run([sys.executable, "-c", _ONE_FILE, str(checkout), str(path), str(model_path),
                                       work], capture_output=True, text=True, check=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1", "GLOG_minloglevel": "2"})
            run = json.loads(done.stdout.strip().splitlines()[-1])
            rates[checkout].append((run["frames"] / run["cpu"], run["frames"] / run["wall"]))
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default="d11.mp4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=str(ROOT / "bench" / "out" / "prepare.json"))
    parser.add_argument("--smoke", action="store_true", help="one round, for CI")
    parser.add_argument("--against", help="another checkout: end-to-end rates of both (see the docstring)")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    path = SHARED / "real-videos" / args.video
    model_path = SHARED / "face-models" / "sfm_3448.npz"
    if not path.exists() or not model_path.exists():
        message = f"bench_prepare: skipped, it needs {path} and {model_path} (../shared/data)"
        if args.smoke:
            print(message)
            return
        sys.exit(message)
    if args.against:
        checkouts = [pathlib.Path(args.against).resolve(), ROOT]
        rates = end_to_end(path, model_path, checkouts, args.repeats)
        print(f"| checkout ({args.video}, {cpu_model()}, 1 torch thread) | input frames per CPU second "
              f"(median) | per round | wall frames/s (median) |")
        print("|---|---|---|---|")
        base = statistics.median(cpu for cpu, _ in rates[checkouts[0]])
        for checkout in checkouts:
            cpu = statistics.median(c for c, _ in rates[checkout])
            rounds = ", ".join(f"{c:.1f}" for c, _ in rates[checkout])
            print(f"| {checkout} | {cpu:.1f} ({cpu / base:.2f}x) | {rounds} | "
                  f"{statistics.median(w for _, w in rates[checkout]):.1f} |")
        return
    torch.set_num_threads(1)
    model = load_model(model_path)
    options = prep.PrepareOptions(model=str(model_path), size=256)
    splits = {}
    for _ in range(args.repeats):  # interleaved, median per stage
        for legacy in (True, False):
            split, frames = profile(path, model, options, legacy)
            for stage, value in split.items():
                splits.setdefault(legacy, {}).setdefault(stage, []).append(1000 * value / frames)
    print(f"| stage ({args.video}, {frames} frames, {cpu_model()}, 1 thread) | before, ms/frame | now, ms/frame |")
    print("|---|---|---|")
    medians = {legacy: {k: statistics.median(v) for k, v in stages.items()} for legacy, stages in splits.items()}
    for stage in medians[True]:
        print(f"| {stage} | {medians[True][stage]:.1f} | {medians[False][stage]:.1f} |")
    total = {legacy: sum(m.values()) for legacy, m in medians.items()}
    print(f"| total | {total[True]:.1f} | {total[False]:.1f} ({total[True] / total[False]:.2f}x) |")
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "video": args.video, "frames": frames,
                                                   "ms_per_frame": {"before": medians[True], "now": medians[False]}},
                                                  indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
