"""The ``reenact`` command line. One subcommand per task; each registers itself in ``COMMANDS``.

Add a subcommand by writing ``add_<name>_parser(subparsers)`` that sets ``func`` and appending it
to ``COMMANDS``. Errors a user can fix (missing files, unreadable media, missing extras) are
reported as one line on stderr with exit status 1, never as a traceback.

Paths that start with '-' must follow ``--``:  ``reenact pncc --out out -- -face.png``.
"""
import argparse
import itertools
import pathlib
import sys

import numpy as np


class CommandError(Exception):
    """A user-facing error: printed as ``reenact: error: <message>``, exit status 1."""


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
    import torch

    from .face3d import detectors as det
    from .face3d.morphable import load_model
    from .face3d.pipeline import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_image, reconstruct, video_frames
    from .face3d.visualize import overlay, pncc_to_uint8, render_fit_pncc

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

    suffix = source.suffix.lower()
    is_video = suffix in VIDEO_SUFFIXES or (suffix not in IMAGE_SUFFIXES and _looks_like_video(source))
    try:
        if is_video:
            count, frames = video_frames(source)
            if args.max_frames > 0:
                count = min(count or args.max_frames, args.max_frames)
                frames = itertools.islice(frames, args.max_frames)
            images = []  # kept for the overlays
            bar = _progress(count, source.name)
            result = reconstruct(_remember(frames, images), model, detector, progress=bar.update)
            bar.close()
        else:
            images = [read_image(source)]
            result = reconstruct(images, model, detector)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise CommandError(str(err)) from None
    finally:
        detector.close()

    if result.fit is None:
        raise CommandError(f"{result.message}: {source}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = source.stem
    inputs = [source]
    fit = result.fit
    found_frames = np.flatnonzero(result.found)
    height, width = images[0].shape[:2]
    for directory in (("pncc", "overlay") if is_video else ()):
        (out_dir / f"{stem}_{directory}").mkdir(exist_ok=True)
    with torch.no_grad():
        for k, frame_index in enumerate(found_frames):
            pncc, mask = render_fit_pncc(model, fit.alpha[k:k + 1], fit.beta[k:k + 1], fit.pose[k:k + 1], height, width)
            picture = overlay(images[frame_index], pncc[0], mask[0], result.landmarks[frame_index],
                              fit.projected[k].numpy())
            if is_video:
                pncc_path = _output_path(out_dir / f"{stem}_pncc", f"{frame_index:06d}.png", inputs)
                overlay_path = _output_path(out_dir / f"{stem}_overlay", f"{frame_index:06d}.png", inputs)
            else:
                pncc_path = _output_path(out_dir, f"{stem}_pncc.png", inputs)
                overlay_path = _output_path(out_dir, f"{stem}_overlay.png", inputs)
            _save_png(pncc_to_uint8(pncc[0]), pncc_path)
            _save_png(picture, overlay_path)
    params = {key: value for key, value in fit.numpy().items()}
    params.update(frame_index=found_frames, found=result.found, landmarks_all=result.landmarks,
                  model_name=np.array(model.name), image_size=np.array([height, width]))
    np.savez(_output_path(out_dir, f"{stem}_params.npz", inputs), **params)
    label = " [synthetic model]" if model.synthetic else ""
    print(f"{source.name}: {result.message}; wrote {out_dir}{label}")
    return 0


def _remember(frames, store):
    for frame in frames:
        store.append(frame)
        yield frame


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
                    "write the PNCC image(s), an overlay on the input and the parameters (.npz).",
    )
    parser.add_argument("input", help="image or video file (put '--' before a name starting with '-')")
    parser.add_argument("--out", required=True, help="output directory (created if needed)")
    parser.add_argument("--model",
                        help="'mediapipe' (built-in real face model; the default with the mediapipe detector), "
                             "'toy' (built-in synthetic head; the default with --landmarks or dlib), a model "
                             ".npz, or 3DDFA_V2's bfm .pkl")
    parser.add_argument("--detector", default="mediapipe", choices=["mediapipe", "dlib"])
    parser.add_argument("--landmarks", help="read landmarks from this file instead of detecting")
    parser.add_argument("--max-frames", type=int, default=0, help="stop a video after this many frames")
    parser.set_defaults(func=run_pncc)


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
    _lazy("data.commands", "add_synth_parser", "add_prepare_parser"),
    _lazy("train", "add_train_parser"),
    _lazy("inference", "add_reenact_parser"),
    _lazy("evaluate", "add_eval_parser"),
    _lazy("demo", "add_demo_parser"),
]


def build_parser():
    parser = argparse.ArgumentParser(prog="reenact", description="Identity-matched PNCC face reenactment.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv=None):
    """Entry point of the ``reenact`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CommandError as err:
        print(f"reenact: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("reenact: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the imported module's main, not this copy's: subcommands import `reenact.cli` and raise
    # its CommandError, which a `python -m reenact.cli` copy of the class would not catch.
    from reenact.cli import main as _main

    sys.exit(_main())
