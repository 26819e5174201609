"""The arguments several commands share, and the check of optional dependencies before any work."""
import importlib.util
import pathlib

from .errors import CommandError

#: Optional modules a command may need: import name -> pip requirement.
REQUIREMENTS = {
    "safetensors": "safetensors", "av": "av==18.1.0", "PIL": "pillow", "mediapipe": "mediapipe==0.10.21",
    "dlib": "dlib", "cv2": "opencv-python",
}


def missing(*modules):
    """The pip requirements of ``modules`` (import names) that cannot be imported here."""
    return [REQUIREMENTS.get(module, module) for module in modules if importlib.util.find_spec(module) is None]


def require(command, *modules, alternative=""):
    """Refuse to start ``command`` when one of ``modules`` is missing, naming the install command."""
    absent = missing(*dict.fromkeys(modules))
    if absent:
        raise CommandError(f"{command} needs {', '.join(absent)}, which cannot be imported; install "
                           f"{'it' if len(absent) == 1 else 'them'} with "
                           f"`pip install {' '.join(repr(m) if '=' in m else m for m in absent)}`"
                           f"{alternative}")


def detector_module(name):
    """The import name of a landmark detector's package ('none' or a landmark file: None)."""
    return {"mediapipe": "mediapipe", "dlib": "dlib"}.get(name)


def subcommand(subparsers, name, run, **texts):
    """The parser of subcommand ``name`` (``texts``: help, description), which runs ``run(args)``."""
    parser = subparsers.add_parser(name, **texts)
    parser.set_defaults(func=run)
    return parser


def add_quiet(parser, help="no progress bar"):
    parser.add_argument("--quiet", action="store_true", help=help)


def add_overwrite(parser, command, folder="--out", replaced=""):
    """``--overwrite``: let ``command`` write into a non-empty ``folder`` it did not create (the
    claim of :mod:`reenact.output_folders`); ``replaced`` says what it then replaces."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"write into a non-empty {folder} that `reenact {command}` did not create{replaced}")


def add_device(parser, help="default: cuda when available, else cpu"):
    parser.add_argument("--device", help=help)


def add_face_model(parser, default="toy", flag="--face-model",
                   help="the face model the dataset was fitted with (default toy)"):
    parser.add_argument(flag, default=default, help=help)


def add_detector(parser, choices=("mediapipe", "dlib"), help=None):
    parser.add_argument("--detector", default="mediapipe", choices=list(choices), help=help)


def directory(path, flag, error=CommandError):
    """``path`` as a Path, refused (``error``) when it exists and is not a directory."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"{flag} must be a directory: {path}")
    return path
