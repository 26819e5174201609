"""The options of ``reenact eval``, their validation and the evaluation's one error type."""
import dataclasses
import pathlib

import torch

from ..validation import is_int


class EvalError(Exception):
    """A user-facing evaluation failure (bad checkpoint, dataset or option)."""


@dataclasses.dataclass
class EvalOptions:
    """The options of ``reenact eval`` (see :mod:`reenact.eval.commands`)."""

    checkpoint: str
    data: str
    out: str = None
    max_clips: int = 0
    batch_size: int = 8
    device: str = None
    source_frame: int = 0
    detector: str = "mediapipe"
    face_model: str = None  # None: the checkpoint's training face model, else the dataset's
    id_model: str = None
    inception: str = None
    overwrite: bool = False
    progress: bool = True

    def validate(self):
        for name, minimum in (("max_clips", 0), ("batch_size", 1), ("source_frame", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < minimum:
                raise EvalError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
        if self.detector not in ("mediapipe", "dlib", "none"):
            raise EvalError(f"--detector must be 'mediapipe', 'dlib' or 'none', got {self.detector!r}")
        checkpoint = pathlib.Path(self.checkpoint)
        if not checkpoint.is_file():
            raise EvalError(f"--checkpoint: no such file: {checkpoint}")
        if not pathlib.Path(self.data).is_dir():
            raise EvalError(f"--data is not a directory: {self.data}")
        for flag, value in (("--id-model", self.id_model), ("--inception", self.inception)):
            if value is not None and not pathlib.Path(value).is_file():
                raise EvalError(f"{flag}: no such file: {value}")

    def out_dir(self):
        if self.out is not None:
            return pathlib.Path(self.out)
        checkpoint = pathlib.Path(self.checkpoint)
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
        return run_dir / f"eval-{checkpoint.stem}"


def first_line(text):
    return str(text).strip().splitlines()[0] if str(text).strip() else repr(text)


def device_of(name):
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise EvalError(f"--device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: CUDA is not available on this machine")
    return device
