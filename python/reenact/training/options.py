"""The options of ``reenact train``, their validation, and the model config they build."""
import dataclasses
import math
import pathlib

from ..data.format import dataset_face_model
from ..model import ReenactorConfig
from ..validation import is_int
from .errors import TrainingError

RESOLUTIONS = (64, 128, 256)
PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass
class TrainOptions:
    """The options of ``reenact train`` (see :mod:`reenact.training.commands` for their meaning)."""

    data: str
    out: str
    config: str = None
    steps: int = 1000
    batch_size: int = 8
    resolution: int = None
    ops: str = None
    perceptual: bool = True
    gan: bool = True  # False: adversarial and feature-matching weights 0 (no discriminator step)
    resume: bool = False
    overwrite: bool = False
    keep_last: int = 3
    checkpoint_every: int = 500
    sample_every: int = None
    seed: int = 0
    loader: str = "auto"
    device: str = None
    face_model: str = None  # None: the model the dataset was fitted with (validate() resolves it)
    lr_g: float = 1e-4
    lr_d: float = 4e-4
    betas: tuple = (0.5, 0.999)
    num_workers: int = 0
    progress: bool = True
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def validate(self):
        def positive_int(name, minimum=1):
            value = getattr(self, name)
            if not is_int(value) or value < minimum:
                flag = "--" + name.replace("_", "-")
                raise TrainingError(f"{flag} must be an integer >= {minimum}, got {value!r}")

        for name in ("steps", "batch_size", "keep_last", "checkpoint_every"):
            positive_int(name)
        if self.sample_every is not None:
            positive_int("sample_every")
        positive_int("num_workers", 0)
        if not is_int(self.seed) or self.seed < 0:
            raise TrainingError(f"--seed must be an integer >= 0, got {self.seed!r}")
        if self.resolution is not None and self.resolution not in RESOLUTIONS:
            raise TrainingError(f"--resolution must be one of {RESOLUTIONS}, got {self.resolution!r}")
        if self.ops is not None and self.ops not in ("fused", "reference"):
            raise TrainingError(f"--ops must be 'fused' or 'reference', got {self.ops!r}")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.loader not in ("auto", "dali", "fallback"):
            raise TrainingError(f"--loader must be 'auto', 'dali' or 'fallback', got {self.loader!r}")
        for name in ("lr_g", "lr_d"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise TrainingError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value!r}")
        if not pathlib.Path(self.data).is_dir():
            raise TrainingError(f"--data is not a directory: {self.data}")
        if self.face_model is None:
            self.face_model = dataset_face_model(self.data) or "toy"
        out = pathlib.Path(self.out)
        if out.exists() and not out.is_dir():
            raise TrainingError(f"--out must be a directory: {out}")


def build_config(options):
    """The ReenactorConfig of a fresh run: ``--config`` (or the small preset with
    ``geometric_input``) with the command-line
    overrides (``--resolution``, ``--ops``, ``--no-perceptual``, ``--no-gan``) applied."""
    if options.config is not None:
        try:
            config = ReenactorConfig.from_json(options.config)
        except (FileNotFoundError, ValueError, TypeError) as err:
            raise TrainingError(f"--config: {err}") from None
    else:
        # With the geometric warp as an input: it beats the PNCC-only generator (issue 13, bench/RESULTS.md).
        config = ReenactorConfig.small(options.resolution or 64, geometric_input=True)
    data = config.to_dict()
    if options.resolution is not None:
        data["model"]["resolution"] = options.resolution
    if options.ops is not None:
        data["model"]["ops"] = options.ops
    if not options.perceptual:
        data["loss"]["perceptual"] = 0.0
    if not options.gan:
        data["loss"]["adversarial"] = data["loss"]["feature_matching"] = 0.0
    if data["model"]["resolution"] not in RESOLUTIONS:
        raise TrainingError(f"the config's model.resolution must be one of {RESOLUTIONS}, "
                            f"got {data['model']['resolution']!r} (or pass --resolution)")
    return ReenactorConfig.from_dict(data)
