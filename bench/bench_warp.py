"""Geometric reenactment benchmark: the warp itself at 256x256 on the CPU, next to its baselines.

Rows, interleaved in one run (median of repeats), on the astronaut portrait fitted with the
built-in mediapipe model and driven by the scripted expressions:
  - ``mesh warp``: reenact.warp.geometric_reenact (rasterize P_d', interpolate the source positions,
    the source z-buffer test, grid_sample), batch 1 and batch 8;
  - ``corr_warp code match``: the all-pairs route the issue first tried: every driving pixel's NCC
    soft-matched to the source's with pncc_cuda.corr_warp (softmax(-|q - k|^2 / tau) through
    augmented dot products, normalize=False), then the matched colours;
  - fitting, measured apart: mediapipe's face mesh on the 512x512 photo, and fit_dense.

    python bench/bench_warp.py [--smoke] [--repeats N]
"""
import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if any((ROOT / "pncc_cuda").glob("_C*.so")):
    sys.path[:0] = [str(ROOT), str(ROOT / "python")]

import pncc_cuda  # noqa: E402
from reenact.face3d import load_model  # noqa: E402
from reenact.face3d.expressions import script_parameters  # noqa: E402
from reenact.face3d.pncc import reconstruct_pncc  # noqa: E402
from reenact.warp import geometric_reenact  # noqa: E402

TEMPERATURE = 1e-3
#: One intra-op thread: on a shared 2-core machine two threads mostly wait on each other.
THREADS = 1


def cpu_name():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def setup(size):
    import numpy as np
    import skimage.data

    from reenact.face3d.detectors import MediapipeDetector

    model = load_model("mediapipe")
    photo = skimage.data.astronaut()
    crop = np.ascontiguousarray(photo[0:256, 100:356])
    timings = {}
    with MediapipeDetector() as detector:
        detector.detect_dense(crop)  # warm-up
        started = time.perf_counter()
        points = detector.detect_dense(crop)
        timings["mediapipe face mesh, 256x256 photo"] = time.perf_counter() - started
    started = time.perf_counter()
    fit = model.fit_dense(points[None])
    timings["fit_dense, 1 frame"] = time.perf_counter() - started
    image = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
    if size != image.shape[-1]:
        image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        fit.pose[:, :2] *= size / 256
    drive = script_parameters(model, fit.beta[0], fit.pose[0])
    return model, image, fit, drive, timings


def code_match(model, image, fit, beta, pose, size):
    """The all-pairs NCC code match of the issue's first attempt -> warped image (B, 3, H, W)."""
    pncc_src, mask_src = reconstruct_pncc(model, fit.alpha, fit.beta, fit.pose, size=size)
    pncc_drv, mask_drv = reconstruct_pncc(model, fit.alpha, beta, pose, size=size)
    keys = pncc_src[0].flatten(1).T[mask_src[0, 0].flatten() > 0]  # (Nk, 3)
    colours = image[0].flatten(1).T[mask_src[0, 0].flatten() > 0]
    out = image.expand(len(beta), -1, -1, -1).clone()
    for b in range(len(beta)):
        covered = mask_drv[b, 0].flatten() > 0
        queries = pncc_drv[b].flatten(1).T[covered]
        query = torch.cat([queries, torch.ones_like(queries[:, :1])], 1)
        key = torch.cat([2 * keys, -(keys * keys).sum(1, keepdim=True)], 1)
        matched = pncc_cuda.corr_warp(query[None], key[None], colours[None], TEMPERATURE, normalize=False)[0]
        out[b].flatten(1)[:, covered] = matched.T
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="64x64, 1 repeat (CI)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    size = 64 if args.smoke else 256
    repeats = 1 if args.smoke else args.repeats
    model, image, fit, drive, fit_timings = setup(size)
    frames = len(drive["labels"])
    picks = torch.linspace(0, frames - 1, 8).long()
    rows = {
        "mesh warp, batch 1": (1, lambda k: geometric_reenact(
            model, image, fit.alpha, fit.beta, fit.pose, drive["beta"][picks[k:k + 1]],
            drive["pose"][picks[k:k + 1]], mode="absolute")),
        "mesh warp, batch 8": (8, lambda k: geometric_reenact(
            model, image, fit.alpha, fit.beta, fit.pose, drive["beta"][picks], drive["pose"][picks],
            mode="absolute")),
        "corr_warp code match, batch 1 (baseline)": (1, lambda k: code_match(
            model, image, fit, drive["beta"][picks[k:k + 1]], drive["pose"][picks[k:k + 1]], size)),
    }
    samples = {name: [] for name in rows}
    cpu_samples = {name: [] for name in rows}  # process CPU time: what a busy shared machine inflates least
    code_repeats = 1 if args.smoke else 3
    with torch.no_grad():
        for name, (_, run) in rows.items():
            run(0)  # warm-up
        for repeat in range(repeats):
            for name, (count, run) in rows.items():
                if name.startswith("corr_warp") and repeat >= code_repeats:
                    continue
                started, cpu_started = time.perf_counter(), time.process_time()
                run(repeat % len(picks))
                samples[name].append((time.perf_counter() - started) / count)
                cpu_samples[name].append((time.process_time() - cpu_started) / count)
    baseline = statistics.median(samples["corr_warp code match, batch 1 (baseline)"])
    print(f"\n{size}x{size}, {cpu_name()}, {torch.get_num_threads()} threads, median of "
          f"{repeats} repeats ({code_repeats} for the code match)\n")
    cpu_baseline = statistics.median(cpu_samples["corr_warp code match, batch 1 (baseline)"])
    print("| row | wall ms / frame | frames/s (wall) | CPU ms / frame | frames/s (CPU time) | speed-up over the code match (wall) |")
    print("|---|---|---|---|---|---|")
    for name, times in samples.items():
        median, cpu = statistics.median(times), statistics.median(cpu_samples[name])
        print(f"| {name} | {median * 1e3:.2f} | {1 / median:.1f} | {cpu * 1e3:.2f} | {1 / cpu:.1f} | "
              f"{baseline / median:.0f}x |")
    print(f"\nload average while it ran: {os.getloadavg()[0]:.1f} (wall times on a busy machine are inflated; "
          f"CPU time is the process's own; code-match CPU time {cpu_baseline * 1e3:.0f} ms)")
    print("\nfitting, measured apart (one run each):\n")
    for name, seconds in fit_timings.items():
        print(f"- {name}: {seconds * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
