"""The per-file work of ``reenact prepare`` (steps 1-4 of :mod:`reenact.data.prepare`), run in a
worker process: decode, detect or read landmarks, cut clips, crop, fit one identity per clip and
encode. Anything that goes wrong costs this one file: the worker sends a skip and its reason."""
import dataclasses
import hashlib
import os
import pathlib
import re
import time
import traceback

import numpy as np
import torch

from ..face3d import detectors as det
from ..face3d.calibration import fit_options_for
from ..face3d.detectors import load_landmarks_file
from ..face3d.fit import fit_clip
from ..face3d.loading import load_model
from . import format as fmt
from .framing import crop_boxes, crop_frame, to_crop
from .video import CODECS, MediaError, encode_video, iter_frames, probe

#: The run's state folder under OUT_DIR (finished files, the workers' native output).
STATE_DIR = ".prepare"
NATIVE_LOG = "native.log"
#: Decoded frames a worker keeps from the detection pass for the cropping pass (a 512x512 video
#: fits whole up to 680 frames); a longer or larger video is decoded a second time instead.
FRAME_CACHE_BYTES = 512 * 2 ** 20


def decode_for_prepare(path):
    """The frames ``prepare`` reads: swscale's YUV conversion (iter_frames' exact one costs more
    than the detector and is only needed by the training loaders)."""
    return iter_frames(path, exact_colour=False)


def _segments(found, clip_length, min_length):
    """Runs of consecutive found frames, split evenly into pieces of at most clip_length."""
    runs, start = [], None
    for index, ok in enumerate(list(found) + [False]):
        if ok and start is None:
            start = index
        elif not ok and start is not None:
            runs.append((start, index))
            start = None
    pieces = []
    for first, stop in runs:
        count = -(-(stop - first) // clip_length)
        edges = np.linspace(first, stop, count + 1).round().astype(int)
        pieces += [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b - a >= min_length]
    return pieces


def _safe_stem(path):
    stem = re.sub(r"[^A-Za-z0-9_.]+", "_", pathlib.Path(path).stem).strip("._-") or "video"
    return stem[:40]


def _landmarks_for(options, relative):
    base = pathlib.Path(options.landmarks_from) / relative
    for candidate in (base.with_name(base.stem + ".landmarks.npy"), base.with_suffix(".npy"),
                      base.with_suffix(".npz"), base.with_suffix(".txt")):
        if candidate.is_file():
            return load_landmarks_file(candidate)
    raise FileNotFoundError(f"no landmark file for {relative} in {options.landmarks_from} "
                            f"(looked for <name>.landmarks.npy, .npy, .npz, .txt)")


#: The stages of ``process_file`` whose CPU time the final report splits.
STAGES = ("decode", "detect", "fit", "crop", "encode")


class _StageClock:
    """Adds the process's CPU time (all its threads) between calls to per-stage totals."""

    def __init__(self, totals):
        self.totals = totals if totals is not None else {}
        for stage in STAGES:  # every stage listed, 0 where it does not run (detect with landmark files)
            self.totals.setdefault(stage, 0.0)
        self.last = time.process_time()

    def charge(self, stage):
        now = time.process_time()
        self.totals[stage] = self.totals.get(stage, 0.0) + now - self.last
        self.last = now


def process_file(path, relative, out_dir, options, decode=decode_for_prepare, model=None, stages=None):
    """Prepare one raw video -> (list of ClipRecord, frames decoded, each clip's fraction of valid
    frames). Raises MediaError/ValueError
    (and the detector's errors) to skip the file. ``model``: the loaded face model (default: load
    ``options.model``). ``stages``: a dict that gets the CPU seconds of each of :data:`STAGES`
    added (opening the file and the detector count as decode)."""
    fps = probe(path)[1]  # also rejects unreadable files before any decoding
    model = model if model is not None else load_model(options.model)
    dense_model = getattr(model, "dense", False)  # fitted to mediapipe's mesh, not to 68 landmarks
    if dense_model and (options.landmarks_from is not None or options.detector != "mediapipe"):
        raise ValueError(f"the {model.name!r} model is fitted to mediapipe's dense face mesh: prepare it with "
                         f"the mediapipe detector, not landmark files or {options.detector}")
    if options.landmarks_from is not None:
        given = _landmarks_for(options, relative)
        detector = None
    else:
        detector = det.make_detector(options.detector, video=True, dense=dense_model)
    landmarks, dense, kept = [], [], []  # kept: decoded frames while they fit FRAME_CACHE_BYTES, else None
    clock = _StageClock(stages)
    try:
        for index, frame in enumerate(decode(path)):
            clock.charge("decode")
            if kept is not None and (len(kept) + 1) * frame.nbytes <= FRAME_CACHE_BYTES:
                kept.append(frame)
            else:
                kept = None
            if detector is None:
                points = given[index] if index < len(given) else np.full((68, 2), np.nan)
            else:
                found = detector.detect(frame)
                points = found.landmarks if found is not None else np.full((68, 2), np.nan)
                if dense_model:
                    dense.append(found.dense if found is not None else np.full((478, 3), np.nan))
                clock.charge("detect")
            landmarks.append(points)
    finally:
        if detector is not None:
            detector.close()
    if not landmarks:
        raise MediaError("no frame decodes")
    landmarks = np.asarray(landmarks, dtype=np.float64)
    found = np.isfinite(landmarks).all((1, 2))
    if not found.any():
        height, width = frame.shape[:2]
        hint = "" if detector is None else (
            f" ({width}x{height}; the {options.detector} detector, with its second pass for small faces, "
            f"found none; a face far smaller than ~{min(width, height) // 16} px here, as in wide full-body "
            f"shots, is missed: crop such videos around the face first)")
        raise MediaError(f"no face found in any of {len(found)} frames{hint}")
    pieces = _segments(found, options.clip_length, options.min_clip_length)
    if not pieces:
        raise MediaError(f"no run of >= {options.min_clip_length} consecutive frames with a face "
                         f"({int(found.sum())} of {len(found)} frames have one)")

    key = hashlib.sha1(str(relative).encode("utf-8")).hexdigest()[:8]
    stem = f"{_safe_stem(relative)}_{key}"
    clips_dir = pathlib.Path(out_dir) / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    # Detected landmarks get the (model, detector) calibration; given landmarks the plain fit.
    fit_options = fit_options_for(model, None if detector is None else options.detector)
    plans = []
    for number, (first, stop) in enumerate(pieces):
        boxes = crop_boxes(landmarks[first:stop], options.crop_scale, options.smooth_sigma)
        crop_points = to_crop(landmarks[first:stop], boxes, options.size)
        if dense_model:  # the mesh into the crop; its depth scales like x and y
            mesh = np.asarray(dense[first:stop], dtype=np.float64)
            step = (boxes[:, 2] - boxes[:, 0]) / options.size
            fit = model.fit_dense(np.concatenate([to_crop(mesh[..., :2], boxes, options.size),
                                                  mesh[..., 2:] / step[:, None, None]], -1))
        else:
            fit = fit_clip(model, torch.from_numpy(crop_points), **fit_options)
        plans.append((number, first, stop, boxes, crop_points, fit))
    clock.charge("fit")

    records, valid_fractions, frames_of = [], [], {n: [] for n, *_ in plans}
    starts = {plan[1]: plan for plan in plans}
    active = None
    for index, frame in enumerate(kept if kept is not None else decode(path)):
        clock.charge("decode")
        if index in starts:
            active = starts[index]
        if active is not None and active[1] <= index < active[2]:
            frames_of[active[0]].append(crop_frame(frame, active[3][index - active[1]], options.size))
            clock.charge("crop")
        if active is not None and index + 1 == active[2]:
            record, valid = _write_clip(out_dir, stem, active, frames_of.pop(active[0]), fps, relative, model, options)
            records.append(record)
            valid_fractions.append(valid)
            active = None
            clock.charge("encode")
    if len(records) != len(plans):
        raise MediaError("the video decoded differently the second time (frames missing)")
    return records, len(landmarks), valid_fractions


def _write_clip(out_dir, stem, plan, frames, fps, relative, model, options):
    number, first, stop, boxes, crop_points, fit = plan
    if len(frames) != stop - first:
        raise MediaError(f"clip {number}: {len(frames)} frames decoded, {stop - first} expected")
    name = f"{stem}_{number:03d}"
    clip_rel, params_rel = f"clips/{name}{CODECS[options.codec][1]}", f"clips/{name}.npz"
    identity = pathlib.PurePath(relative).stem
    encode_video(pathlib.Path(out_dir) / clip_rel, np.stack(frames), fps=fps, codec=options.codec)
    fmt.save_params(pathlib.Path(out_dir) / params_rel, alpha=fit.clip_alpha[0].numpy(), pose=fit.pose.numpy(),
                    beta=fit.beta.numpy(), landmarks=crop_points, crop_box=boxes, valid=fit.ok.numpy(),
                    identity=identity, model_name=model.name, image_size=options.size)
    return fmt.ClipRecord(clip=clip_rel, params=params_rel, frames=len(frames), fps=float(fps),
                          identity=identity, source=str(pathlib.PurePosixPath(*pathlib.PurePath(relative).parts)),
                          codec=options.codec, size=options.size, synthetic=model.synthetic), float(fit.ok.float().mean())


def _send_native_output_to(path):
    """Point this process's stderr (file descriptor 2, which native libraries such as mediapipe's
    TFLite and absl write to directly) at the end of ``path``."""
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(handle, 2)
    os.close(handle)


def _worker(connection, path, relative, out_dir, options, decode, model):
    """Worker process entry: one file; sends ("ok", records, frames, valid fractions, stage CPU
    seconds) or ("skip", reason, 0, None, None)."""
    try:
        _send_native_output_to(pathlib.Path(out_dir) / STATE_DIR / NATIVE_LOG)
        torch.set_num_threads(1)
        stages = {}
        records, frames, valid = process_file(path, relative, out_dir, options, decode, model, stages)
        connection.send(("ok", [dataclasses.asdict(r) for r in records], frames, valid, stages))
    except (MediaError, ValueError, FileNotFoundError, ImportError, OSError) as err:
        connection.send(("skip", f"{type(err).__name__}: {err}", 0, None, None))
    except Exception as err:  # noqa: BLE001 - any other failure costs this file, with its trace logged
        connection.send(("skip", f"unexpected {type(err).__name__}: {err} | {traceback.format_exc(limit=3)}", 0,
                         None, None))
    finally:
        connection.close()
