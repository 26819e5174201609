"""The ``reenact reenact`` subcommand: detect and fit the source and the driving video, then
:func:`~reenact.inference.animation.animate` and encode (the module docstring there has the pipeline)."""
import contextlib
import pathlib

import torch

from ..cli.arguments import add_detector, add_device, add_quiet, detector_module, require, subcommand
from ..cli.errors import INPUT_ERRORS, CommandError, UsageError, output_path, reported
from ..data.video import MediaError, encode_video, iter_frames, probe
from ..face3d import detectors as det
from ..face3d.loading import load_model
from ..face3d.pipeline import read_image, reconstruct
from ..progress import progress_bar
from ..training.checkpoints import load_generator, read_checkpoint_meta
from ..training.errors import TrainingError
from ..data.framing import CROP_SCALE_RANGE
from .animation import (
    DEFAULT_CROP_SCALE,
    GEOMETRIC_FACE_MODEL,
    OUTPUT_CODECS,
    POSE_MODES,
    animate,
    fill_missing,
    side_by_side,
)


def add_parser(subparsers):
    """Register ``reenact``."""
    parser = subcommand(
        subparsers, "reenact", run, help="animate a source image with a driving video",
        description="Detect and fit the source and every driving frame, reconstruct identity-matched "
                    "PNCCs, generate the animated face and paste it back into the source image; "
                    "writes an H.264 .mp4 (or VP9 .webm) of the source image's size.")
    parser.add_argument("--checkpoint", help="a training checkpoint (.safetensors); without one, the "
                                             "training-free geometric mode warps the source along the "
                                             "identity-matched driving mesh")
    parser.add_argument("--source", required=True, help="source image")
    parser.add_argument("--driving", required=True, help="driving video")
    parser.add_argument("--out", required=True, help="output video (.mp4 or .webm)")
    parser.add_argument("--pose", default="relative", choices=POSE_MODES,
                        help="relative: the driving head motion since its first frame, applied to the "
                             "source pose (default); absolute: the driving pose as it is")
    parser.add_argument("--side-by-side", action="store_true", help="write source | driving | P_d' | result")
    parser.add_argument("--batch-size", type=int, default=8, help="frames per generator call (default 8)")
    add_detector(parser)
    parser.add_argument("--source-landmarks", help="read the source's 68 landmarks from this file instead of detecting")
    parser.add_argument("--driving-landmarks", help="read the driving frames' landmarks from this file (one set per frame)")
    parser.add_argument("--face-model", help="face model (default: the one the checkpoint was trained with; "
                                             f"{GEOMETRIC_FACE_MODEL!r} without a checkpoint)")
    parser.add_argument("--crop-scale", type=float,
                        help="face crop side over the landmark box side (default: the framing of the "
                             f"checkpoint's training data, else {DEFAULT_CROP_SCALE}, `reenact prepare`'s)")
    add_device(parser)
    add_quiet(parser, help="no progress bars (reports are still printed)")



def load_checkpoint(path, device="cpu"):
    """(generator in eval mode, checkpoint metadata) of a training checkpoint; raises CommandError
    naming the problem when the file is not a compatible reenact checkpoint."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CommandError(f"checkpoint not found: {path}")
    with reported(TrainingError, prefix="--checkpoint: "):
        meta = read_checkpoint_meta(path)
        generator, _ = load_generator(path, device=device)
    return generator, meta


def _even(image):
    height, width = image.shape[:2]
    return image[:height - height % 2, :width - width % 2]


def _detector(args, landmarks, video):
    if landmarks:
        return det.FileLandmarks(landmarks)
    return det.make_detector(args.detector, video=video)


def _fit_driving(args, model, path, bar):
    """Detect and fit every driving frame -> (driving_params, frame count, faceless count)."""
    detector = _detector(args, args.driving_landmarks, video=True)
    try:
        frames = iter_frames(path)
        if args.driving_landmarks:
            frames = _checked_count(frames, len(detector), args.driving_landmarks)
        result = reconstruct(frames, model, detector, progress=bar.update)
    finally:
        detector.close()
        bar.close()
    if result.fit is None:
        raise ValueError(f"no face found in any of the {len(result.found)} driving frames of {path}")
    found = result.found
    fit = result.fit
    params = {"beta": fill_missing(found, fit.beta.numpy()), "pose": fill_missing(found, fit.pose.numpy()),
              "landmarks": fill_missing(found, result.landmarks[found])}
    return params, len(found), int((~found).sum())


def _checked_count(frames, expected, landmarks_path):
    count = 0
    for frame in frames:
        count += 1
        if count > expected:
            raise ValueError(f"the driving landmark file {landmarks_path} has {expected} frames; the video has more")
        yield frame
    if count != expected:
        raise ValueError(f"the driving landmark file {landmarks_path} has {expected} frames; the video has {count}")


def run(args):
    """``reenact reenact``: see :mod:`reenact.inference.animation`."""
    source, driving, out = (pathlib.Path(p) for p in (args.source, args.driving, args.out))
    for flag, path in (("--source", source), ("--driving", driving)):
        if not path.is_file():
            raise UsageError(f"{flag} not found: {path}")
    inputs = [source, driving] + ([pathlib.Path(args.checkpoint)] if args.checkpoint else [])
    inputs += [pathlib.Path(p) for p in (args.source_landmarks, args.driving_landmarks) if p]
    out = output_path(out.parent, out.name, inputs)
    codec = OUTPUT_CODECS.get(out.suffix.lower())
    if codec is None:
        raise UsageError(f"--out must end in {' or '.join(OUTPUT_CODECS)}, got {out.name!r}")
    if out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"--out's folder is not a directory: {out.parent}")
    if out.is_dir():
        raise UsageError(f"--out names a folder, not a video file: {out}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    low, high = CROP_SCALE_RANGE
    if args.crop_scale is not None and not low <= args.crop_scale <= high:
        raise UsageError(f"--crop-scale must be in [{low:g}, {high:g}], got {args.crop_scale}")
    # Checked before any work: Pillow reads the source, PyAV the driving video and the output,
    # safetensors the checkpoint; a detector unless both landmark files are given.
    detecting = not (args.source_landmarks and args.driving_landmarks)
    require("reenact reenact", "PIL", "av", *(("safetensors",) if args.checkpoint else ()),
            *((detector_module(args.detector),) if detecting else ()))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.checkpoint:
        generator, meta = load_checkpoint(args.checkpoint, device)
        model_name = meta.get("options", {}).get("face_model", "toy")
    else:  # the training-free geometric mode
        generator, meta, model_name = None, {}, GEOMETRIC_FACE_MODEL
    crop_scale = args.crop_scale or meta.get("data", {}).get("crop_scale") or DEFAULT_CROP_SCALE
    verbose = not args.quiet
    with reported(MediaError, *INPUT_ERRORS):
        model = load_model(args.face_model or model_name)
        image = read_image(source)
        fps = probe(driving)[1]
        with contextlib.closing(_detector(args, args.source_landmarks, video=False)) as detector:
            found = reconstruct([image], model, detector)
        if found.fit is None:
            raise CommandError(f"no face found in the source image {source}")
        even = _even(image)
        if even.shape != image.shape:
            print(f"note: the source is {image.shape[1]}x{image.shape[0]}; the video is "
                  f"{even.shape[1]}x{even.shape[0]} (H.264/VP9 4:2:0 needs even sizes)")
        fit = found.fit
        source_params = {"alpha": fit.alpha[0], "beta": fit.beta[0], "pose": fit.pose[0],
                         "landmarks": found.landmarks[0]}
        driving_params, count, faceless = _fit_driving(
            args, model, driving, progress_bar(None, f"fit {driving.name}", "frame", verbose))
        if faceless:
            print(f"{faceless} of {count} driving frame(s) had no face; each holds the last good frame's "
                  f"pose and expression")
        bar = progress_bar(count, "reenact", "frame", verbose)
        frames = animate(generator, model, even, source_params, driving_params, pose_mode=args.pose,
                         batch_size=args.batch_size, crop_scale=crop_scale, progress=bar.update)
        if args.side_by_side:
            frames = (side_by_side(even, _even(drv), f.pncc, f.image)
                      for f, drv in zip(frames, iter_frames(driving)))
        else:
            frames = (f.image for f in frames)
        out.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(bar):
            written = encode_video(out, frames, fps=fps, codec=codec)
    label = " [synthetic face model]" if model.synthetic else ""
    mode = "learned" if generator is not None else "geometric (no checkpoint)"
    print(f"wrote {out}: {written} frame(s), {args.pose} pose, {mode} mode{label}")
    return 0
