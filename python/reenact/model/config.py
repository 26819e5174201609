"""Configuration of the reenactment model and its losses: plain dataclasses, JSON round trip.

`ReenactorConfig` holds a `ModelConfig` (sizes, temperature, which ops) and a `LossConfig`
(every loss weight). Two presets:

- `ReenactorConfig.small(resolution)`: a few-thousand-parameter-per-layer model for CPU tests,
  the offline demo and the CPU benchmark. The perceptual loss is off, because its VGG-19
  weights are a user-supplied file that an offline run does not have.
- `ReenactorConfig.paper()`: the paper-scale 256x256 model (correspondence at 64x64 with 256
  channels, the size the corr_warp benchmark targets).

`to_dict`/`from_dict` use only JSON types, so a config can be stored inside a checkpoint's
metadata or in a `--config FILE` JSON file. Unknown keys are rejected, so a typo in a config file
is an error rather than a silently ignored setting.
"""
import dataclasses
import json
import pathlib
from dataclasses import dataclass, field

from ..validation import is_int, is_number, read_json

OPS_CHOICES = ("fused", "reference")

# Each level of the pyramids is one scale: level 0 is full resolution, level 1 is 1/2, level 2
# is 1/4 (where the correspondence runs by default). The geometry encoder goes one level deeper
# (1/8) for a larger receptive field of its correspondence features, hence resolution % 8 == 0.
NUM_LEVELS = 3
CORRESPONDENCE_LEVELS = (1, 2)

# Documented limits of a config (RELIABILITY.md item 18): a config comes from a file (--config, a
# checkpoint's metadata), and these sizes decide how much memory the model allocates, so each is
# capped far above the paper's model (256 px, 256 channels, 2 blocks) but below what would exhaust
# memory before the first step. A larger value is refused when the config is read.
MAX_RESOLUTION = 1024
MAX_CHANNELS = 2048
MAX_BLOCKS = 64
MAX_DISCRIMINATOR_LAYERS = 8
MAX_DISCRIMINATOR_SCALES = 4


def _check_widths(value, name, length):
    if not isinstance(value, (tuple, list)) or len(value) != length:
        raise ValueError(f"{name} must be a sequence of {length} channel counts, got {value!r}")
    for v in value:
        if not is_int(v) or not 1 <= v <= MAX_CHANNELS:
            raise ValueError(f"{name} must contain integers in [1, {MAX_CHANNELS}], got {value!r}")
    return tuple(value)


def _check_positive_int(value, name, maximum):
    if not is_int(value) or not 1 <= value <= maximum:
        raise ValueError(f"{name} must be an integer in [1, {maximum}], got {value!r}")


def _check_weight(value, name):
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0 <= value <= 1e6):  # NaN compares false; a huge int never reaches float()
        raise ValueError(f"{name} must be a finite number in [0, 1e6], got {value!r}")


@dataclass
class ModelConfig:
    """Sizes of the networks. Widths are listed per pyramid level: (full, 1/2, 1/4).

    Attributes:
        resolution: input and output height = width, in pixels; a multiple of 8 (64, 128, 256).
        geometry_channels: widths of the geometry encoder E_g at full, 1/2, 1/4 resolution; its
            1/8 bottleneck has twice the 1/4 width.
        geometry_blocks: residual blocks in the E_g bottleneck at 1/8 resolution.
        geometry_coordinates: append the pixel grid (2 channels) to the PNCC input of E_g, so that
            the uniform background (PNCC = 0) still has position-dependent features and matches
            the same place in the source, instead of averaging over the whole background.
        geometric_input: give the generator the training-free geometric warp of the source
            (:mod:`reenact.warp`: the source image sampled along the identity-matched mesh) and its
            hole mask as a fourth input, (B, 4, H, W) = [warped RGB in [-1, 1], holes in {0, 1}].
            The decoder then predicts an image and a blend mask m; the output is
            m * warped + (1 - m) * decoded, so it starts near the warp and learns where to repair
            it (holes, the mouth interior, the mesh border). False in a config that does not name
            it, so checkpoints written before the flag existed load as they were trained.
        correspondence_channels: C of the correspondence features (query/key of corr_warp).
        correspondence_level: the pyramid level where corr_warp runs: 2 (1/4 resolution, the
            design's default) or 1 (1/2 resolution: 4x the positions, 16x the work and the size
            of the similarity matrix that the reference op materialises; finer correspondence).
        appearance_channels: widths of the appearance encoder E_a at full, 1/2, 1/4.
        decoder_channels: widths of the SPADE decoder at 1/4, 1/2, full resolution.
        decoder_blocks: SPADE residual blocks per decoder level (at least 1).
        spade_hidden_channels: hidden width of the SPADE modulation convs.
        gate_hidden_channels: hidden width of each geometry-aware gate.
        discriminator_channels: width of the first PatchGAN layer (doubled per layer, up to 512).
        discriminator_layers: stride-2 layers of each PatchGAN.
        discriminator_scales: number of PatchGANs, each on a 2x smaller copy of the input.
        discriminator_spectral_norm: spectral normalisation of the discriminator convolutions.
        temperature: softmax temperature of corr_warp (CoCosNet: 0.01).
        ops: "fused" (pncc_cuda kernels) or "reference" (pure PyTorch), see reenact.model.ops.
    """

    resolution: int = 256
    geometry_channels: tuple = (64, 128, 256)
    geometry_blocks: int = 2
    geometry_coordinates: bool = True
    geometric_input: bool = False
    correspondence_channels: int = 256
    correspondence_level: int = 2
    appearance_channels: tuple = (64, 128, 256)
    decoder_channels: tuple = (256, 128, 64)
    decoder_blocks: int = 1
    spade_hidden_channels: int = 128
    gate_hidden_channels: int = 32
    discriminator_channels: int = 64
    discriminator_layers: int = 3
    discriminator_scales: int = 2
    discriminator_spectral_norm: bool = True
    temperature: float = 0.01
    ops: str = "fused"

    def __post_init__(self):
        _check_positive_int(self.resolution, "resolution", MAX_RESOLUTION)
        if self.resolution % 8 != 0 or self.resolution < 32:
            raise ValueError(
                f"resolution must be a multiple of 8 and at least 32 (64, 128, 256), got "
                f"{self.resolution}"
            )
        self.geometry_channels = _check_widths(
            self.geometry_channels, "geometry_channels", NUM_LEVELS)
        self.appearance_channels = _check_widths(
            self.appearance_channels, "appearance_channels", NUM_LEVELS)
        self.decoder_channels = _check_widths(
            self.decoder_channels, "decoder_channels", NUM_LEVELS)
        for name, maximum in (("geometry_blocks", MAX_BLOCKS), ("decoder_blocks", MAX_BLOCKS),
                              ("correspondence_channels", MAX_CHANNELS), ("spade_hidden_channels", MAX_CHANNELS),
                              ("gate_hidden_channels", MAX_CHANNELS), ("discriminator_channels", MAX_CHANNELS),
                              ("discriminator_layers", MAX_DISCRIMINATOR_LAYERS),
                              ("discriminator_scales", MAX_DISCRIMINATOR_SCALES)):
            _check_positive_int(getattr(self, name), name, maximum)
        for name in ("geometry_coordinates", "geometric_input", "discriminator_spectral_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_weight(self.temperature, "temperature")
        if self.temperature == 0:
            raise ValueError("temperature must be > 0, got 0")
        if self.correspondence_level not in CORRESPONDENCE_LEVELS or isinstance(
                self.correspondence_level, bool):
            raise ValueError(
                f"correspondence_level must be one of {CORRESPONDENCE_LEVELS} (1/2 or 1/4 "
                f"resolution), got {self.correspondence_level!r}")
        if self.ops not in OPS_CHOICES:
            raise ValueError(f"ops must be one of {OPS_CHOICES}, got {self.ops!r}")


@dataclass
class LossConfig:
    """Weights of every loss term; a weight of 0 switches its term off (and skips its cost).

    Attributes:
        reconstruction: L1 between the output and the driving frame, in [-1, 1] image units.
        perceptual: VGG-19 feature L1 (pix2pixHD's weighting over relu1_1..relu5_1). Needs
            `perceptual_weights_path`; 0 disables it (`--no-perceptual`).
        perceptual_layer_weights: weights of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1.
        perceptual_weights_path: a VGG-19 state dict file (torchvision layout, `features.N.*`
            keys), `.safetensors` or a `torch.save` file (loaded with weights_only=True).
        adversarial: hinge GAN loss of the generator.
        feature_matching: L1 between the discriminator features of output and driving frame.
        warp: L1 between corr_warp of the downsampled source RGB and the driving frame
            downsampled alike (to the correspondence level's size); it trains the correspondence
            directly, which the decoder alone learns slowly.
    """

    reconstruction: float = 1.0
    perceptual: float = 10.0
    perceptual_layer_weights: tuple = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)
    perceptual_weights_path: str = None
    adversarial: float = 1.0
    feature_matching: float = 10.0
    warp: float = 10.0

    def __post_init__(self):
        for name in ("reconstruction", "perceptual", "adversarial", "feature_matching", "warp"):
            _check_weight(getattr(self, name), name)
        layer_weights = self.perceptual_layer_weights
        if not isinstance(layer_weights, (tuple, list)) or len(layer_weights) != 5:
            raise ValueError(
                f"perceptual_layer_weights must be 5 numbers (relu1_1..relu5_1), got "
                f"{layer_weights!r}"
            )
        for w in layer_weights:
            _check_weight(w, "perceptual_layer_weights")
        self.perceptual_layer_weights = tuple(float(w) for w in layer_weights)
        if self.perceptual_weights_path is not None and not isinstance(
                self.perceptual_weights_path, (str, pathlib.PurePath)):
            raise TypeError(
                f"perceptual_weights_path must be a path or None, got "
                f"{type(self.perceptual_weights_path).__name__}"
            )
        if isinstance(self.perceptual_weights_path, pathlib.PurePath):
            self.perceptual_weights_path = str(self.perceptual_weights_path)


def _from_dict(cls, data, where):
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a dict, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; known keys: {sorted(names)}")
    return cls(**data)


@dataclass
class ReenactorConfig:
    """The whole configuration: `model` sizes and `loss` weights."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    @classmethod
    def small(cls, resolution=64, geometric_input=False):
        """The small CPU model (tests, the offline demo, CPU benchmarks); perceptual loss off.
        ``geometric_input``: see ModelConfig; ``reenact train``'s default config and the demo turn it on
        (it wins on held-out pairs, bench/RESULTS.md), the network tests leave it off."""
        model = ModelConfig(
            resolution=resolution,
            geometric_input=geometric_input,
            geometry_channels=(8, 16, 32),
            geometry_blocks=1,
            correspondence_channels=32,
            appearance_channels=(8, 16, 32),
            decoder_channels=(32, 16, 8),
            spade_hidden_channels=16,
            gate_hidden_channels=8,
            discriminator_channels=16,
            discriminator_layers=2,
            discriminator_scales=2,
        )
        return cls(model=model, loss=LossConfig(perceptual=0.0))

    @classmethod
    def paper(cls):
        """The paper-scale 256x256 model (needs a VGG-19 weights file for the perceptual loss)."""
        return cls(model=ModelConfig(resolution=256), loss=LossConfig())

    def to_dict(self):
        """A dict of JSON types (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data):
        """Inverse of `to_dict`. Missing keys take their defaults; unknown keys raise ValueError."""
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - {"model", "loss"})
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}; known keys: ['loss', 'model']")
        return cls(
            model=_from_dict(ModelConfig, data.get("model", {}), "config['model']"),
            loss=_from_dict(LossConfig, data.get("loss", {}), "config['loss']"),
        )

    def to_json(self, path=None):
        """The config as a JSON string; also written to `path` when one is given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            pathlib.Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path):
        """Read a config written by `to_json` (a file path)."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = read_json(path, "config file")  # size, nesting and UTF-8 checked (reenact.validation)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"config file {path}: {error}") from None
