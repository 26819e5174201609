"""The reenactment generator: (source image, P_s, P_d') -> animated face, plus its byproducts.

    model = Reenactor(config.model)
    outputs = model(source_image, source_pncc, driving_pncc)
    outputs["output"]        # (B, 3, H, W) in [-1, 1]

    # Many driving frames of one source (inference): encode the source once.
    encoding = model.encode_source(source_image[:1], source_pncc[:1])
    outputs = model.drive(encoding, driving_pncc)   # any batch of driving frames

Data flow (levels: 0 = full, 1 = 1/2, 2 = 1/4 resolution; c = config.correspondence_level, 2 by
default):

1. E_g encodes P_s and P_d' in one batched pass (shared weights).
2. E_a encodes [source image, P_s] into the pyramid A_s.
3. One corr_warp call (query E_g(P_d'), key E_g(P_s)) warps the value
   [A_s level c, source RGB at level c, P_s at level c, pixel grid] to the driving layout:
   warped features, the warped source image (for the warp loss), the warped P_s (for the
   level-c gate) and the flow.
4. The other levels warp A_s and P_s with grid_sample along the resized flow.
5. At every level a geometry-aware gate weighs the warped features; the SPADE decoder, conditioned
   on P_d', decodes the gated skips.

Steps 2 and the source half of 1 and 3 depend on the source alone: `encode_source` computes them
into a `SourceEncoding`, and `drive` runs the rest for a batch of driving PNCCs. `forward` is the
same two stages, except that E_g encodes P_s and P_d' in one batched call as it always did (E_g
has no batch-dependent layers, so this is the same maths; it keeps training bit for bit as it was
and is one call instead of two).
"""
import typing

import torch
import torch.nn.functional as F
from torch import nn

from .config import NUM_LEVELS, ModelConfig
from .correspondence import Correspondence, resize_flow, warp_image, warp_with_flow
from .discriminator import MultiScaleDiscriminator
from .encoders import AppearanceEncoder, GeometryEncoder, GeometryFeatures
from .generator import GEOMETRIC_CHANNELS, GeometryAwareGate, SPADEDecoder, resize_pncc

__all__ = ["Reenactor", "SourceEncoding", "build_discriminator", "preview_panels"]


def _check_image(x, name, shape):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 4 or tuple(x.shape[1:]) != shape[1:] or (
            shape[0] is not None and x.shape[0] != shape[0]):
        expected = "(" + ", ".join("B" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")


class SourceEncoding(typing.NamedTuple):
    """What the driving stage needs of a source (`Reenactor.encode_source`); Bs = source batch.

    correspondence: (Bs, correspondence_channels, h, w), E_g(P_s) at the correspondence level,
        the corr_warp key.
    values: (Bs, appearance_channels[c] + 6, h, w), what corr_warp warps (less the pixel grid
        it appends): [A_s at level c, source RGB at level c, P_s at level c].
    appearance: tuple of 3 (Bs, appearance_channels[l], H/2^l, W/2^l), the pyramid A_s.
    pncc: tuple of 3 (Bs, 3, H/2^l, W/2^l), P_s at each level (level 0 is P_s itself).
    """

    correspondence: torch.Tensor
    values: torch.Tensor
    appearance: tuple
    pncc: tuple

    @property
    def batch(self):
        return self.correspondence.shape[0]

    def expand(self, batch):
        """The encoding for `batch` driving frames: itself when it has that batch, views of its
        tensors expanded along the batch when it has batch 1 (no copy)."""
        if self.batch == batch:
            return self

        def grow(x):
            return x.expand(batch, *x.shape[1:])

        return SourceEncoding(grow(self.correspondence), grow(self.values),
                              tuple(grow(x) for x in self.appearance),
                              tuple(grow(x) for x in self.pncc))


class Reenactor(nn.Module):
    """The generator network of the reenactment model.

    Args:
        config: a ModelConfig.
    """

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.geometry_encoder = GeometryEncoder(
            config.geometry_channels, config.correspondence_channels, config.geometry_blocks,
            config.geometry_coordinates, config.correspondence_level)
        self.appearance_encoder = AppearanceEncoder(config.appearance_channels)
        self.correspondence = Correspondence(config.temperature, config.ops)
        self.gates = nn.ModuleList([
            GeometryAwareGate(config.geometry_channels[level], config.appearance_channels[level],
                              config.gate_hidden_channels)
            for level in range(NUM_LEVELS)
        ])
        self.decoder = SPADEDecoder(
            config.appearance_channels, config.geometry_channels[2], config.decoder_channels,
            config.spade_hidden_channels, config.decoder_blocks, config.geometric_input)

    @property
    def ops(self):
        """The name of the ops in use: "fused" or "reference"."""
        return self.correspondence.ops.name

    def set_ops(self, ops):
        """Switch every op of the model to "fused" or "reference" (same weights)."""
        self.correspondence.set_ops(ops)
        return self

    def _check_source(self, source_image, source_pncc):
        resolution = self.config.resolution
        shape = (None, 3, resolution, resolution)
        _check_image(source_image, "source_image", shape)
        _check_image(source_pncc, "source_pncc", (source_image.shape[0],) + shape[1:])

    def _check_geometric(self, geometric, driving_pncc):
        if not self.config.geometric_input:
            if geometric is not None:
                raise ValueError("geometric was given but this model's config has geometric_input=False")
            return
        if geometric is None:
            raise ValueError("this model's config has geometric_input=True: pass geometric, the geometric warp "
                             "of the source and its hole mask (reenact.data.pncc.batch_geometric)")
        resolution = self.config.resolution
        _check_image(geometric, "geometric", (driving_pncc.shape[0], GEOMETRIC_CHANNELS, resolution, resolution))

    def _check_encoding(self, encoding, driving_pncc):
        if not isinstance(encoding, SourceEncoding):
            raise TypeError(f"encoding must be a SourceEncoding (from Reenactor.encode_source), "
                            f"got {type(encoding).__name__}")
        config = self.config
        resolution = config.resolution
        level = config.correspondence_level
        side = resolution >> level
        expected = {
            "correspondence": (config.correspondence_channels, side, side),
            "values": (config.appearance_channels[level] + 6, side, side),
        }
        for name, shape in expected.items():
            x = getattr(encoding, name)
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != shape:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(
                    f"encoding.{name} must have shape (Bs, {', '.join(map(str, shape))}) for this "
                    f"model, got {got}: was the encoding made by a model of another config?")
        batch = driving_pncc.shape[0]
        if encoding.batch not in (1, batch):
            raise ValueError(
                f"driving_pncc must have the batch of the source encoding ({encoding.batch}), or "
                f"any batch for an encoding of batch 1, got {tuple(driving_pncc.shape)}")
        if encoding.correspondence.device != driving_pncc.device:
            raise ValueError(f"encoding is on {encoding.correspondence.device} but driving_pncc "
                             f"is on {driving_pncc.device}")

    def encode_source(self, source_image, source_pncc):
        """The source stage: everything that depends on the source alone.

        Args:
            source_image: (Bs, 3, H, W) in [-1, 1], H = W = config.resolution.
            source_pncc: (Bs, 3, H, W) in [0, 1], P_s.

        Returns:
            a SourceEncoding of batch Bs, for `drive`. It holds the graph of its tensors: under
            `torch.no_grad` (inference) it holds none.
        """
        self._check_source(source_image, source_pncc)
        geometry = self.geometry_encoder(source_pncc)
        return self._encode_source(source_image, source_pncc, geometry.correspondence)

    def drive(self, encoding, driving_pncc, geometric=None):
        """The driving stage: the outputs of `forward` for the encoded source and each P_d'.

        Args:
            encoding: a SourceEncoding of `encode_source`, of batch B or 1; batch 1 serves all
                B driving frames (expanded views; only corr_warp's row layout copies its key and
                values per frame).
            driving_pncc: (B, 3, H, W) in [0, 1], P_d'.
            geometric: as in `forward`.

        Returns:
            the dict of `forward`.
        """
        resolution = self.config.resolution
        _check_image(driving_pncc, "driving_pncc", (None, 3, resolution, resolution))
        self._check_encoding(encoding, driving_pncc)
        self._check_geometric(geometric, driving_pncc)
        return self._drive(encoding, driving_pncc, self.geometry_encoder(driving_pncc), geometric)

    def forward(self, source_image, source_pncc, driving_pncc, geometric=None):
        """
        Args:
            source_image: (B, 3, H, W) in [-1, 1], H = W = config.resolution.
            source_pncc: (B, 3, H, W) in [0, 1], P_s.
            driving_pncc: (B, 3, H, W) in [0, 1], P_d' (source identity, driving expression
                and pose).
            geometric: (B, 4, H, W), [the source warped along the identity-matched mesh in
                [-1, 1], its hole mask], required exactly when config.geometric_input
                (`reenact.data.pncc.batch_geometric`); None otherwise.

        Returns:
            dict with
              "output": (B, 3, H, W) in [-1, 1], the reenacted face;
              "warped": (B, 3, h, w), the source image warped by the correspondence, at the
                  correspondence level (h = H/4 by default, H/2 with correspondence_level 1;
                  the warp loss compares it with the driving frame);
              "warped_pncc": (B, 3, h, w), P_s warped the same way;
              "flow": (B, 2, h, w), the source position (x, y) of every driving position, in
                  grid_sample coordinates (reenact.model.correspondence);
              "gates": tuple of 3 gates (B, 1, H/2^l, W/2^l) in (0, 1), levels l = 0, 1, 2.

        The same as `drive(encode_source(source_image, source_pncc), driving_pncc)`, but E_g
        encodes P_s and P_d' in one batched call (see the module docstring).
        """
        self._check_source(source_image, source_pncc)
        batch, resolution = source_image.shape[0], self.config.resolution
        _check_image(driving_pncc, "driving_pncc", (batch, 3, resolution, resolution))
        self._check_geometric(geometric, driving_pncc)

        geometry = self.geometry_encoder(torch.cat((source_pncc, driving_pncc), dim=0))
        source_correspondence, driving_correspondence = geometry.correspondence.chunk(2)
        driving_geometry = GeometryFeatures(tuple(level[batch:] for level in geometry.pyramid),
                                            driving_correspondence)
        encoding = self._encode_source(source_image, source_pncc, source_correspondence)
        return self._drive(encoding, driving_pncc, driving_geometry, geometric)

    def _encode_source(self, source_image, source_pncc, source_correspondence):
        """The source stage after E_g(P_s): E_a and the corr_warp values -> SourceEncoding."""
        appearance = self.appearance_encoder(source_image, source_pncc)
        pncc = tuple(resize_pncc(source_pncc, features.shape[-2:]) for features in appearance)
        level = self.config.correspondence_level
        source_features = appearance[level]
        values = torch.cat((
            source_features,
            F.adaptive_avg_pool2d(source_image, source_features.shape[-2:]).to(source_features.dtype),
            pncc[level].to(source_features.dtype),
        ), dim=1)
        return SourceEncoding(source_correspondence, values, appearance, pncc)

    def _drive(self, encoding, driving_pncc, driving_geometry, geometric=None):
        """The driving stage after E_g(P_d'): steps 3-5 of the module docstring -> outputs."""
        encoding = encoding.expand(driving_pncc.shape[0])
        warped_values, flow = self.correspondence(
            driving_geometry.correspondence, encoding.correspondence, encoding.values)
        correspondence_level = self.config.correspondence_level
        channels = encoding.appearance[correspondence_level].shape[1]
        warped_source_features = warped_values[:, :channels]
        warped_image = warped_values[:, channels:channels + 3]
        warped_pncc = warped_values[:, channels + 3:]

        gated_skips, gates = [], []
        for level in range(NUM_LEVELS):
            size = encoding.appearance[level].shape[-2:]
            if level == correspondence_level:
                warped_features, warped_source_pncc = warped_source_features, warped_pncc
            else:
                level_flow = resize_flow(flow, size)
                warped_features = warp_with_flow(encoding.appearance[level], level_flow)
                warped_source_pncc = warp_with_flow(encoding.pncc[level], level_flow)
            disagreement = (resize_pncc(driving_pncc, size) - warped_source_pncc).abs()
            gate = self.gates[level](driving_geometry.pyramid[level], warped_features, disagreement)
            gates.append(gate)
            gated_skips.append(gate * warped_features)

        output = self.decoder(gated_skips, driving_geometry.pyramid[2], driving_pncc, geometric)
        return {
            "output": output,
            "warped": warped_image,
            "warped_pncc": warped_pncc,
            "flow": flow,
            "gates": tuple(gates),
        }


def build_discriminator(config):
    """The MultiScaleDiscriminator of a ModelConfig."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    return MultiScaleDiscriminator(config.discriminator_channels, config.discriminator_layers,
                                   config.discriminator_scales,
                                   config.discriminator_spectral_norm)


def preview_panels(source_image, driving_image, driving_pncc, outputs):
    """The logging/demo row: source | driving | P_d' | warped source | output, side by side.

    Args:
        source_image, driving_image: (B, 3, H, W) in [-1, 1].
        driving_pncc: (B, 3, H, W) in [0, 1].
        outputs: the dict of Reenactor.forward; the source is warped at full resolution along
            its upsampled flow.

    Returns:
        (B, 3, H, 5 W) float32 in [0, 1], detached.
    """
    with torch.no_grad():
        warped = warp_image(source_image.float(), outputs["flow"].float())
        panels = [(source_image.float() + 1) / 2, (driving_image.float() + 1) / 2,
                  driving_pncc.float(), (warped + 1) / 2, (outputs["output"].float() + 1) / 2]
        return torch.cat(panels, dim=3).clamp(0, 1)
