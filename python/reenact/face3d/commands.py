"""The face3d subcommands of ``reenact``: ``pncc`` (fit a face, write its PNCC) and ``models``."""
import contextlib
import itertools
import pathlib
import sys

import numpy as np
import torch

from ..cli.errors import INPUT_ERRORS, CommandError, output_path, reported
from ..progress import progress_bar
from ..cli.arguments import add_detector, detector_module, directory, require, subcommand
from ..data.video import VideoWriter, probe
from . import detectors as det, pipeline
from .calibration import fit_options_for
from .loading import load_model
from .registry import BUILT_IN, installed_models, model_dirs
from .visualize import overlay, pncc_to_uint8, render_fit_pncc


def add_pncc_parser(subparsers):
    parser = subcommand(
        subparsers, "pncc", run, help="fit a 3D face to an image or video and write its PNCC",
        description="Detect 68 landmarks, fit the morphable model (one identity per video) and "
                    "write the PNCC, an overlay on the input (PNGs for an image; <name>_pncc.mp4 and "
                    "<name>_overlay.mp4 for a video, streamed, so memory does not grow with its length) "
                    "and the parameters (<name>_params.npz, with the model's name).",
    )
    parser.add_argument("input", help="image or video file (put '--' before a name starting with '-')")
    parser.add_argument("--out", required=True, help="output directory (created if needed)")
    parser.add_argument("--model",
                        help="'mediapipe' (built-in real face model; the default with the mediapipe detector), "
                             "'toy' (built-in synthetic head; the default with --landmarks or dlib), another "
                             "model name (`reenact models` lists them), a model .npz, 3DDFA_V2's bfm .pkl, or a "
                             "folder of eos's Surrey Face Model files")
    add_detector(parser)
    parser.add_argument("--landmarks", help="read landmarks from this file instead of detecting")
    parser.add_argument("--max-frames", type=int, default=0, help="stop a video after this many frames")
    parser.add_argument("--png", action="store_true",
                        help="for a video, also write one PNCC and one overlay PNG per frame with a face "
                             "(<name>_pncc/, <name>_overlay/) next to <name>_pncc.mp4 and <name>_overlay.mp4")


def add_models_parser(subparsers):
    parser = subcommand(subparsers, "models", run, help="list the face models, where they are installed, their licences",
                                   description="List the face models --model accepts: the built-in toy head and "
                                               "the real models installed in the model folders.")


def add_parser(subparsers):
    """Register ``pncc`` and ``models``."""
    add_pncc_parser(subparsers)
    add_models_parser(subparsers)


def _save_png(array, path):
    from PIL import Image  # optional dependency (pillow), checked by run_pncc before any work

    Image.fromarray(array).save(path)


def run_pncc(args):
    """``reenact pncc INPUT --out DIR``: detect, fit, write PNCC, overlay and parameters."""
    source = pathlib.Path(args.input)
    if not source.exists():
        raise CommandError(f"input not found: {source}")
    out_dir = directory(args.out, "--out")
    suffix = source.suffix.lower()
    is_video = suffix in pipeline.VIDEO_SUFFIXES or (suffix not in pipeline.IMAGE_SUFFIXES and _looks_like_video(source))
    # Checked before any work: images are read and written with Pillow, videos with OpenCV and PyAV.
    needs = ("cv2", "av") + (("PIL",) if args.png else ()) if is_video else ("PIL",)
    require("reenact pncc", *needs, *(() if args.landmarks else (detector_module(args.detector),)))
    with reported(*INPUT_ERRORS):
        # A real photo or video goes to the built-in real face model; 68-point landmarks to the toy head.
        default = "toy" if (args.landmarks or args.detector != "mediapipe") else "mediapipe"
        model = load_model(args.model or default)
        if args.landmarks:
            detector = det.FileLandmarks(args.landmarks)
        else:
            detector = det.make_detector(args.detector, video=source.suffix.lower() in pipeline.VIDEO_SUFFIXES)
    if model.synthetic and not args.landmarks:
        print(f"reenact: warning: fitting the synthetic toy head to real {args.detector} landmarks; its "
              f"PNCC is not a real face shape. Install a real model (`reenact models`) and pass --model.",
              file=sys.stderr)
    fit_options = fit_options_for(model, None if args.landmarks else args.detector)

    def decoded():
        """The video's frames (up to --max-frames) and their count: decoded once per pass."""
        count, frames = pipeline.video_frames(source)
        if args.max_frames > 0:
            count = min(count or args.max_frames, args.max_frames)
            frames = itertools.islice(frames, args.max_frames)
        return count, frames

    with reported(*INPUT_ERRORS), contextlib.closing(detector):
        if is_video:
            # Pass 1 keeps only landmarks; pass 2 decodes again to render (memory flat in length).
            count, frames = decoded()
            bar = progress_bar(count, f"{source.name}: fit")
            result = pipeline.reconstruct(frames, model, detector, progress=bar.update, **fit_options)
            bar.close()
        else:
            image = pipeline.read_image(source)
            result = pipeline.reconstruct([image], model, detector, **fit_options)

    if result.fit is None:
        raise CommandError(f"{result.message}: {source}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem, inputs = source.stem, [source]
    with reported(ValueError, prefix=f"{source}: "):
        if is_video:
            count, frames = decoded()
            height, width, fps = _write_pncc_videos(out_dir, stem, inputs, model, result, frames, count, args.png,
                                                    _video_fps(source))
        else:
            height, width = image.shape[:2]
            pncc, picture = _render_frame(model, result, 0, 0, image)
            _save_png(pncc, output_path(out_dir, f"{stem}_pncc.png", inputs))
            _save_png(picture, output_path(out_dir, f"{stem}_overlay.png", inputs))
    params = dict(result.fit.numpy())
    params.update(frame_index=np.flatnonzero(result.found), found=result.found, landmarks_all=result.landmarks,
                  model_name=np.array(model.name), image_size=np.array([height, width]))
    np.savez(output_path(out_dir, f"{stem}_params.npz", inputs), **params)
    label = " [synthetic model]" if model.synthetic else ""
    print(f"{source.name}: {result.message}; wrote {out_dir}{label}")
    return 0


def _render_frame(model, result, k, frame_index, image):
    """PNCC and overlay (H, W, 3) uint8 of found frame number ``k`` (input frame ``frame_index``)."""
    fit = result.fit
    height, width = image.shape[:2]
    with torch.no_grad():
        pncc, mask = render_fit_pncc(model, fit.alpha[k:k + 1], fit.beta[k:k + 1], fit.pose[k:k + 1], height, width)
    picture = overlay(image, pncc[0], mask[0], result.landmarks[frame_index], fit.projected[k].numpy())
    return pncc_to_uint8(pncc[0]), picture


def _write_pncc_videos(out_dir, stem, inputs, model, result, frames, count, png, fps):
    """Stream ``<stem>_pncc.mp4`` and ``<stem>_overlay.mp4`` (H.264; frames without a face: a
    black PNCC and the plain frame), and with ``png`` one PNG per found frame as well."""
    found_number = np.cumsum(result.found) - 1  # input frame -> its row in the fit
    writers = [VideoWriter(output_path(out_dir, f"{stem}_{kind}.mp4", inputs), fps=fps, codec="h264")
               for kind in ("pncc", "overlay")]
    if png:
        for kind in ("pncc", "overlay"):
            (out_dir / f"{stem}_{kind}").mkdir(exist_ok=True)
    bar = progress_bar(count, f"{stem}: render")
    height = width = 0
    with writers[0], writers[1]:
        for index, image in enumerate(frames):
            if index >= len(result.found):
                break  # the second decode gave more frames than the first: ignore the extra
            height, width = image.shape[:2]
            if result.found[index]:
                pncc, picture = _render_frame(model, result, int(found_number[index]), index, image)
                if png:
                    _save_png(pncc, output_path(out_dir / f"{stem}_pncc", f"{index:06d}.png", inputs))
                    _save_png(picture, output_path(out_dir / f"{stem}_overlay", f"{index:06d}.png", inputs))
            else:
                pncc, picture = np.zeros_like(image), image
            for writer, picture_or_code in zip(writers, (pncc, picture)):
                writer.write(_even(picture_or_code))
            bar.update()
    bar.close()
    return height, width, fps


def _even(image):
    """Pad an (H, W, 3) image by one replicated row/column where H or W is odd (4:2:0 video)."""
    pad = ((0, image.shape[0] % 2), (0, image.shape[1] % 2), (0, 0))
    return np.pad(image, pad, mode="edge") if any(p[1] for p in pad[:2]) else image


def _video_fps(path):
    try:
        return probe(path)[1]
    except (ValueError, ImportError):
        return 25.0


def _looks_like_video(path):
    try:
        from PIL import Image  # optional dependency: without it, anything not an image suffix is a video

        with Image.open(path):
            return False
    except (ImportError, OSError, ValueError):
        return True


def run_models(args):
    """``reenact models``: every known face model, whether it is installed, and its licence."""
    print(f"model folders: {', '.join(str(d) for d in model_dirs())} (set REENACT_MODELS to change)")
    for info, path in installed_models():
        where = "built in" if info.name in BUILT_IN else (str(path) if path else f"not installed; get it from {info.source}")
        print(f"{info.name:16s} {info.description}\n{'':16s} licence: {info.licence}\n{'':16s} {where}")
    return 0


def run(args):
    """Run the face3d subcommand that ``args`` names."""
    return {"pncc": run_pncc, "models": run_models}[args.command](args)
