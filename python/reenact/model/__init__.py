"""The reenactment model: encoders, correspondence, generator, discriminator and losses.

A training step, in full:

    from reenact.model import ReenactorConfig, Reenactor, ReenactmentLoss, build_discriminator

    config = ReenactorConfig.small(64)             # or .paper(), or .from_json(path)
    generator = Reenactor(config.model)            # config.model.ops: "fused" | "reference"
    discriminator = build_discriminator(config.model)
    losses = ReenactmentLoss(config.loss)          # reads the VGG-19 file when perceptual > 0

    outputs = generator(source_image, source_pncc, driving_pncc)
    g = losses.generator_loss(outputs, driving_image, driving_pncc, discriminator)
    g.total.backward(); g_optimizer.step()         # the discriminator gets no gradient here
    d = losses.discriminator_loss(discriminator, outputs["output"].detach(), driving_image,
                                  driving_pncc)
    d.total.backward(); d_optimizer.step()

Inference on many driving frames of one source encodes the source once:
`encoding = generator.encode_source(source_image, source_pncc)`, then
`generator.drive(encoding, driving_pncc)` per batch of frames (an encoding of batch 1 serves any
batch).

Images are (B, 3, H, W) in [-1, 1]; PNCCs are (B, 3, H, W) in [0, 1] (DESIGN.md, Conventions).
"""
from .config import LossConfig, ModelConfig, ReenactorConfig
from .correspondence import (
    Correspondence,
    pixel_grid,
    resize_flow,
    warp_image,
    warp_with_flow,
)
from .discriminator import MultiScaleDiscriminator, PatchDiscriminator
from .encoders import AppearanceEncoder, GeometryEncoder
from .generator import GeometryAwareGate, SPADEDecoder
from .losses import LossResult, PerceptualLoss, ReenactmentLoss
from .ops import get_ops
from .reenactor import Reenactor, SourceEncoding, build_discriminator, preview_panels

__all__ = [
    "ReenactorConfig", "ModelConfig", "LossConfig",
    "Reenactor", "SourceEncoding", "build_discriminator", "preview_panels",
    "ReenactmentLoss", "LossResult", "PerceptualLoss",
    "GeometryEncoder", "AppearanceEncoder", "Correspondence", "GeometryAwareGate",
    "SPADEDecoder", "MultiScaleDiscriminator", "PatchDiscriminator",
    "get_ops", "pixel_grid", "resize_flow", "warp_image", "warp_with_flow",
]
