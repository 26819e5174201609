"""The ``reenact`` command line. One subcommand per task; each registers itself in ``COMMANDS``.

Add a subcommand by writing ``add_<name>_parser(subparsers)`` that sets ``func`` and appending it
to ``COMMANDS``. Errors a user can fix (missing files, unreadable media, missing extras) are
reported as one line on stderr with exit status 1 (2 for a bad option value, :class:`UsageError`),
never as a traceback; ``reenact --debug COMMAND ...`` shows it.

Paths that start with '-' must follow ``--``:  ``reenact pncc --out out -- -face.png``.
"""
import argparse
import itertools
import pathlib
import sys

import numpy as np

from .validation import InputError


class CommandError(Exception):
    """A user-facing error: printed as ``reenact: error: <message>``, exit status 1."""

    exit_status = 1


class UsageError(CommandError):
    """A command line that asks for something impossible (a bad option value): exit status 2,
    like argparse's own usage errors."""

    exit_status = 2


def _progress(total, description):
    """A tqdm progress bar on stderr when tqdm is installed, else a silent stand-in."""
    try:
        from tqdm import tqdm
    except ImportError:
        class _Silent:
            def update(self, n=1):
                """No progress display without tqdm."""

            def close(self):
                """Nothing to close."""

        return _Silent()
    return tqdm(total=total, desc=description, unit="frame", file=sys.stderr)


def _output_path(out_dir, name, inputs):
    path = out_dir / name
    if any(path.resolve() == i.resolve() for i in inputs):
        raise CommandError(f"refusing to overwrite the input {path}")
    return path


def _save_png(array, path):
    from PIL import Image

    Image.fromarray(array).save(path)


def run_pncc(args):
    """``reenact pncc INPUT --out DIR``: detect, fit, write PNCC, overlay and parameters."""
    from .face3d import detectors as det
    from .face3d.calibration import fit_options_for
    from .face3d.morphable import load_model
    from .face3d.pipeline import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_image, reconstruct, video_frames

    source = pathlib.Path(args.input)
    if not source.exists():
        raise CommandError(f"input not found: {source}")
    out_dir = pathlib.Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CommandError(f"--out must be a directory: {out_dir}")
    try:
        # A real photo or video goes to the built-in real face model; 68-point landmarks to the toy head.
        default = "toy" if (args.landmarks or args.detector != "mediapipe") else "mediapipe"
        model = load_model(args.model or default)
        if args.landmarks:
            detector = det.FileLandmarks(args.landmarks)
        else:
            detector = det.make_detector(args.detector, video=source.suffix.lower() in VIDEO_SUFFIXES)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise CommandError(str(err)) from None
    if model.synthetic and not args.landmarks:
        print(f"reenact: warning: fitting the synthetic toy head to real {args.detector} landmarks; its "
              f"PNCC is not a real face shape. Install a real model (`reenact models`) and pass --model.",
              file=sys.stderr)
    fit_options = fit_options_for(model, None if args.landmarks else args.detector)

    suffix = source.suffix.lower()
    is_video = suffix in VIDEO_SUFFIXES or (suffix not in IMAGE_SUFFIXES and _looks_like_video(source))

    def decoded():
        """The video's frames (up to --max-frames) and their count: decoded once per pass."""
        count, frames = video_frames(source)
        if args.max_frames > 0:
            count = min(count or args.max_frames, args.max_frames)
            frames = itertools.islice(frames, args.max_frames)
        return count, frames

    try:
        if is_video:
            # Pass 1 keeps only landmarks; pass 2 decodes again to render (memory flat in length).
            count, frames = decoded()
            bar = _progress(count, f"{source.name}: fit")
            result = reconstruct(frames, model, detector, progress=bar.update, **fit_options)
            bar.close()
        else:
            image = read_image(source)
            result = reconstruct([image], model, detector, **fit_options)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise CommandError(str(err)) from None
    finally:
        detector.close()

    if result.fit is None:
        raise CommandError(f"{result.message}: {source}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem, inputs = source.stem, [source]
    try:
        if is_video:
            count, frames = decoded()
            height, width, fps = _write_pncc_videos(out_dir, stem, inputs, model, result, frames, count, args.png,
                                                    _video_fps(source))
        else:
            height, width = image.shape[:2]
            pncc, picture = _render_frame(model, result, 0, 0, image)
            _save_png(pncc, _output_path(out_dir, f"{stem}_pncc.png", inputs))
            _save_png(picture, _output_path(out_dir, f"{stem}_overlay.png", inputs))
    except ValueError as err:
        raise CommandError(f"{source}: {err}") from None
    params = dict(result.fit.numpy())
    params.update(frame_index=np.flatnonzero(result.found), found=result.found, landmarks_all=result.landmarks,
                  model_name=np.array(model.name), image_size=np.array([height, width]))
    np.savez(_output_path(out_dir, f"{stem}_params.npz", inputs), **params)
    label = " [synthetic model]" if model.synthetic else ""
    print(f"{source.name}: {result.message}; wrote {out_dir}{label}")
    return 0


def _render_frame(model, result, k, frame_index, image):
    """PNCC and overlay (H, W, 3) uint8 of found frame number ``k`` (input frame ``frame_index``)."""
    import torch

    from .face3d.visualize import overlay, pncc_to_uint8, render_fit_pncc

    fit = result.fit
    height, width = image.shape[:2]
    with torch.no_grad():
        pncc, mask = render_fit_pncc(model, fit.alpha[k:k + 1], fit.beta[k:k + 1], fit.pose[k:k + 1], height, width)
    picture = overlay(image, pncc[0], mask[0], result.landmarks[frame_index], fit.projected[k].numpy())
    return pncc_to_uint8(pncc[0]), picture


def _write_pncc_videos(out_dir, stem, inputs, model, result, frames, count, png, fps):
    """Stream ``<stem>_pncc.mp4`` and ``<stem>_overlay.mp4`` (H.264; frames without a face: a
    black PNCC and the plain frame), and with ``png`` one PNG per found frame as well."""
    from .data.video import VideoWriter

    found_number = np.cumsum(result.found) - 1  # input frame -> its row in the fit
    writers = [VideoWriter(_output_path(out_dir, f"{stem}_{kind}.mp4", inputs), fps=fps, codec="h264")
               for kind in ("pncc", "overlay")]
    if png:
        for kind in ("pncc", "overlay"):
            (out_dir / f"{stem}_{kind}").mkdir(exist_ok=True)
    bar = _progress(count, f"{stem}: render")
    height = width = 0
    with writers[0], writers[1]:
        for index, image in enumerate(frames):
            if index >= len(result.found):
                break  # the second decode gave more frames than the first: ignore the extra
            height, width = image.shape[:2]
            if result.found[index]:
                pncc, picture = _render_frame(model, result, int(found_number[index]), index, image)
                if png:
                    _save_png(pncc, _output_path(out_dir / f"{stem}_pncc", f"{index:06d}.png", inputs))
                    _save_png(picture, _output_path(out_dir / f"{stem}_overlay", f"{index:06d}.png", inputs))
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
        from .data.video import probe

        return probe(path)[1]
    except (ValueError, ImportError):
        return 25.0


def _looks_like_video(path):
    try:
        from PIL import Image

        with Image.open(path):
            return False
    except (ImportError, OSError, ValueError):
        return True


def add_pncc_parser(subparsers):
    parser = subparsers.add_parser(
        "pncc", help="fit a 3D face to an image or video and write its PNCC",
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
    parser.add_argument("--detector", default="mediapipe", choices=["mediapipe", "dlib"])
    parser.add_argument("--landmarks", help="read landmarks from this file instead of detecting")
    parser.add_argument("--max-frames", type=int, default=0, help="stop a video after this many frames")
    parser.add_argument("--png", action="store_true",
                        help="for a video, also write one PNCC and one overlay PNG per frame with a face "
                             "(<name>_pncc/, <name>_overlay/) next to <name>_pncc.mp4 and <name>_overlay.mp4")
    parser.set_defaults(func=run_pncc)


def run_models(args):
    """``reenact models``: every known face model, whether it is installed, and its licence."""
    from .face3d.registry import BUILT_IN, installed_models, model_dirs

    print(f"model folders: {', '.join(str(d) for d in model_dirs())} (set REENACT_MODELS to change)")
    for info, path in installed_models():
        where = "built in" if info.name in BUILT_IN else (str(path) if path else f"not installed; get it from {info.source}")
        print(f"{info.name:16s} {info.description}\n{'':16s} licence: {info.licence}\n{'':16s} {where}")
    return 0


def add_models_parser(subparsers):
    parser = subparsers.add_parser("models", help="list the face models, where they are installed, their licences",
                                   description="List the face models --model accepts: the built-in toy head and "
                                               "the real models installed in the model folders.")
    parser.set_defaults(func=run_models)


def _lazy(module, *registrars):
    """A registrar that imports ``reenact.<module>`` only when the parser is built, so that
    ``reenact --help`` and each command import no more than they need at module load."""
    def register(subparsers):
        import importlib

        loaded = importlib.import_module(f"{__package__}.{module}")
        for name in registrars:
            getattr(loaded, name)(subparsers)

    return register


#: Subcommand registrars, in the order of `reenact --help`.
COMMANDS = [
    add_pncc_parser,
    add_models_parser,
    _lazy("data.commands", "add_synth_parser", "add_prepare_parser", "add_merge_parser"),
    _lazy("train", "add_train_parser"),
    _lazy("inference", "add_reenact_parser"),
    _lazy("evaluate", "add_eval_parser"),
    _lazy("demo", "add_demo_parser"),
]


def build_parser():
    parser = argparse.ArgumentParser(prog="reenact", description="Identity-matched PNCC face reenactment.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for register in COMMANDS:
        register(subparsers)
    return parser


def _report(message):
    """One line on stderr, whatever the message holds (newlines, text quoted from a library)."""
    print("reenact: error: " + " ".join(str(message).split()), file=sys.stderr)


def main(argv=None):
    """Entry point of the ``reenact`` script; returns the exit status.

    Every failure ends in one ``reenact: error:`` line (RELIABILITY.md item 19): status 2 for a
    usage error, 1 for anything at run time, and a traceback only with ``reenact --debug``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CommandError as err:
        if args.debug:
            raise
        _report(err)
        return err.exit_status
    except KeyboardInterrupt:
        print("reenact: interrupted", file=sys.stderr)
        return 130
    except InputError as err:  # a file that the validation layer refused, where no command reworded it
        if args.debug:
            raise
        _report(err)
        return 1
    except OSError as err:  # e.g. an unwritable output, a name the file system refuses
        if args.debug:
            raise
        where = f"{err.filename}: " if err.filename else ""
        _report(f"{args.command}: {where}{err.strerror or err}")
        return 1
    except MemoryError:
        if args.debug:
            raise
        _report(f"{args.command}: out of memory (rerun with --debug for the traceback)")
        return 1
    except Exception as err:  # noqa: BLE001 - the last line of defence: no traceback for users
        if args.debug:
            raise
        _report(f"{args.command}: unexpected {type(err).__name__}: {err} (rerun with `reenact --debug "
                f"{args.command} ...` for the traceback, and please report it)")
        return 1


if __name__ == "__main__":
    # Run the imported module's main, not this copy's: subcommands import `reenact.cli` and raise
    # its CommandError, which a `python -m reenact.cli` copy of the class would not catch.
    from reenact.cli import main as _main

    sys.exit(_main())
