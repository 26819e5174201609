"""Geometry-aware skip gates and the SPADE decoder conditioned on the driving PNCC.

The decoder normalises with parameter-free instance normalisation inside SPADE (per-sample, so
it behaves the same in training and inference and under any DDP split), but its residual
shortcuts are plain 1x1 convolutions of the un-normalised input. Instance normalisation removes
each channel's mean over the image; if every path were normalised, the absolute colour of the
source (skin tone, lighting), which only the skip features carry, could not reach the output.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GEOMETRIC_CHANNELS", "GeometryAwareGate", "SPADE", "SPADEResidualBlock", "SPADEDecoder", "resize_pncc"]

_NEGATIVE_SLOPE = 0.2
#: Channels of the geometric warp input (ModelConfig.geometric_input): warped RGB and the hole mask.
GEOMETRIC_CHANNELS = 4


def resize_pncc(pncc, size):
    """Area-downsample (or bilinearly upsample) a PNCC (B, 3, H, W) to `size` (h, w)."""
    if tuple(pncc.shape[-2:]) == tuple(size):
        return pncc
    if pncc.shape[-2] >= size[0] and pncc.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(pncc, size)
    return F.interpolate(pncc, size=size, mode="bilinear", align_corners=False)


class GeometryAwareGate(nn.Module):
    """gate = sigmoid(conv([driving geometry features, warped features, |P_d' - warp(P_s)|])).

    The gate is open where the warped source geometry agrees with the driving geometry, and
    learns to close where the decoder must hallucinate (disocclusions, an opened mouth).

    Args:
        geometry_channels: channels of the E_g(P_d') features at this level.
        feature_channels: channels of the warped appearance features at this level.
        hidden_channels: width of the hidden conv.

    Returns (forward): gate (B, 1, h, w) in (0, 1), one value per pixel, shared by the channels.
    """

    def __init__(self, geometry_channels, feature_channels, hidden_channels):
        super().__init__()
        self.hidden = nn.Conv2d(geometry_channels + feature_channels + 3, hidden_channels, 3,
                                padding=1)
        self.out = nn.Conv2d(hidden_channels, 1, 3, padding=1)
        # Start mostly open (sigmoid(2) = 0.88): early in training the warped features are the
        # decoder's only source of appearance, and a half-closed gate would only slow that down.
        nn.init.constant_(self.out.bias, 2.0)

    def forward(self, driving_geometry, warped_features, pncc_disagreement):
        """(B,Cg,h,w), (B,Cf,h,w), (B,3,h,w) -> (B,1,h,w)."""
        x = torch.cat((driving_geometry, warped_features,
                       pncc_disagreement.to(warped_features.dtype)), dim=1)
        return torch.sigmoid(self.out(F.leaky_relu(self.hidden(x), _NEGATIVE_SLOPE)))


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: instance_norm(x) * (1 + gamma(P)) + beta(P).

    Args:
        channels: channels of x.
        hidden_channels: width of the shared conv on the conditioning PNCC.
    """

    def __init__(self, channels, hidden_channels):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(3, hidden_channels, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden_channels, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden_channels, channels, 3, padding=1)

    def forward(self, x, pncc):
        """x: (B, C, h, w); pncc: (B, 3, H, W), resized to (h, w) here."""
        condition = self.shared(resize_pncc(pncc, x.shape[-2:]).to(x.dtype))
        return self.norm(x) * (1 + self.gamma(condition)) + self.beta(condition)


class SPADEResidualBlock(nn.Module):
    """SPADE residual block (Park et al. 2019) with an un-normalised 1x1 shortcut.

    (B, in_channels, h, w), PNCC -> (B, out_channels, h, w).
    """

    def __init__(self, in_channels, out_channels, hidden_channels):
        super().__init__()
        middle = min(in_channels, out_channels)
        self.norm1 = SPADE(in_channels, hidden_channels)
        # No bias: the instance norm of norm2 subtracts it again right away.
        self.conv1 = nn.Conv2d(in_channels, middle, 3, padding=1, bias=False)
        self.norm2 = SPADE(middle, hidden_channels)
        self.conv2 = nn.Conv2d(middle, out_channels, 3, padding=1)
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else nn.Conv2d(in_channels, out_channels, 1, bias=False))

    def forward(self, x, pncc):
        residual = self.conv1(F.leaky_relu(self.norm1(x, pncc), _NEGATIVE_SLOPE))
        residual = self.conv2(F.leaky_relu(self.norm2(residual, pncc), _NEGATIVE_SLOPE))
        return self.shortcut(x) + residual


class SPADEDecoder(nn.Module):
    """Decodes the gated skips from 1/4 to full resolution, conditioned on P_d'.

    Level 2 (1/4) starts from [gated skip, E_g(P_d') features]; each finer level upsamples the
    previous one 2x (bilinear) and concatenates that level's gated skip. Every level runs
    `blocks` SPADE residual blocks; a 3x3 conv and tanh give the RGB image in [-1, 1].

    Args:
        skip_channels: channels of the gated skips at levels 0, 1, 2 (full, 1/2, 1/4).
        geometry_channels: channels of E_g(P_d') at level 2.
        channels: decoder widths at levels 2, 1, 0 (coarse to fine).
        hidden_channels: SPADE hidden width.
        blocks: SPADE residual blocks per level.
        geometric: also take the geometric warp input (B, 4, H, W) = [warped RGB, holes] at full
            resolution (ModelConfig.geometric_input): it joins the level-0 input, and the last conv
            predicts a blend mask m besides the image; the output is m * warped + (1 - m) * image.
    """

    #: The blend mask starts mostly on the warp (sigmoid(2) = 0.88): the decoder learns where to
    #: take over (holes, the mouth interior, the mesh border) instead of first re-learning the face.
    BLEND_BIAS = 2.0

    def __init__(self, skip_channels, geometry_channels, channels, hidden_channels, blocks=1, geometric=False):
        super().__init__()
        self.geometric = geometric
        self.levels = nn.ModuleList()
        previous = geometry_channels
        for index, width in enumerate(channels):
            level = 2 - index
            in_channels = previous + skip_channels[level] + (GEOMETRIC_CHANNELS if geometric and level == 0 else 0)
            self.levels.append(nn.ModuleList(
                [SPADEResidualBlock(in_channels, width, hidden_channels)]
                + [SPADEResidualBlock(width, width, hidden_channels) for _ in range(blocks - 1)]
            ))
            previous = width
        self.to_rgb = nn.Conv2d(previous, 4 if geometric else 3, 3, padding=1)
        if geometric:
            with torch.no_grad():
                self.to_rgb.bias[3] = self.BLEND_BIAS

    def forward(self, gated_skips, driving_geometry, driving_pncc, geometric=None):
        """
        Args:
            gated_skips: (skip_0, skip_1, skip_2), skip_l of shape (B, skip_channels[l], H/2^l,
                W/2^l).
            driving_geometry: (B, geometry_channels, H/4, W/4), E_g(P_d') at 1/4.
            driving_pncc: (B, 3, H, W), the SPADE condition.
            geometric: (B, 4, H, W) [warped RGB in [-1, 1], holes], given exactly when the decoder
                was built with ``geometric=True``.

        Returns:
            (B, 3, H, W) in [-1, 1].
        """
        x = driving_geometry
        for index, blocks in enumerate(self.levels):
            skip = gated_skips[2 - index]
            if index > 0:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat((x, skip.to(x.dtype)), dim=1)
            if self.geometric and index == len(self.levels) - 1:
                x = torch.cat((x, geometric.to(x.dtype)), dim=1)
            for block in blocks:
                x = block(x, driving_pncc)
        out = self.to_rgb(F.leaky_relu(x, _NEGATIVE_SLOPE))
        if not self.geometric:
            return torch.tanh(out)
        blend = torch.sigmoid(out[:, 3:])
        return blend * geometric[:, :3].to(out.dtype) + (1 - blend) * torch.tanh(out[:, :3])
