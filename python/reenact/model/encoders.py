"""The geometry encoder E_g (PNCC -> pyramid + correspondence features) and the appearance
encoder E_a ([image, PNCC] -> pyramid).

Neither encoder normalises its activations. PNCC values are codes (the position of a vertex on
the mean face), so instance or group normalisation, which subtracts per-image statistics, would
change what a colour means from one image to the next; batch normalisation would make the
features depend on the batch and on train/eval mode, which correspondence matching should not.

Downsampling uses 4x4 stride-2 convolutions with padding 1: output pixel j then covers input
pixels 2j-1..2j+2 and is centred at 2j + 0.5, the same place as the centre of a 2x2 average
pool. The pyramid levels, the avg-pooled PNCCs and the flow's pixel grid all stay aligned.
"""
import collections

import torch
import torch.nn.functional as F
from torch import nn

from .correspondence import pixel_grid

__all__ = ["GeometryEncoder", "AppearanceEncoder", "GeometryFeatures", "ResidualBlock"]

_NEGATIVE_SLOPE = 0.2

GeometryFeatures = collections.namedtuple("GeometryFeatures", ["pyramid", "correspondence"])
GeometryFeatures.__doc__ = """Output of GeometryEncoder.

pyramid: tuple of (B, geometry_channels[l], H / 2^l, W / 2^l) for levels l = 0, 1, 2.
correspondence: (B, correspondence_channels, H / 2^c, W / 2^c), the corr_warp query/key
    features at the correspondence level c (2 by default: 1/4 resolution).
"""


def conv_block(in_channels, out_channels, stride=1):
    """3x3 conv (or 4x4 stride-2 conv when stride == 2), then LeakyReLU(0.2)."""
    if stride == 1:
        conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    else:
        conv = nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1)
    return nn.Sequential(conv, nn.LeakyReLU(_NEGATIVE_SLOPE))


class ResidualBlock(nn.Module):
    """x + conv(lrelu(conv(lrelu(x)))), two 3x3 convs, constant width; (B,C,h,w) -> (B,C,h,w)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        residual = self.conv1(F.leaky_relu(x, _NEGATIVE_SLOPE))
        residual = self.conv2(F.leaky_relu(residual, _NEGATIVE_SLOPE))
        return x + residual


class GeometryEncoder(nn.Module):
    """E_g: a PNCC (B, 3, H, W) in [0, 1] -> GeometryFeatures.

    The pyramid goes down to 1/4; a bottleneck at 1/8 with residual blocks widens the receptive
    field of the correspondence features, which are computed at the correspondence level from
    the upsampled bottleneck and that pyramid level (a U-Net step), so they are both local and
    contextual.

    Args:
        channels: widths at full, 1/2 and 1/4 resolution; the bottleneck has 2x the 1/4 width.
        correspondence_channels: width of the correspondence features.
        blocks: residual blocks in the bottleneck.
        coordinates: append the pixel grid (2 channels) to the input, see ModelConfig.
        correspondence_level: pyramid level of the correspondence features (1 or 2).
    """

    def __init__(self, channels, correspondence_channels, blocks=2, coordinates=True,
                 correspondence_level=2):
        super().__init__()
        c1, c2, c4 = channels
        self.coordinates = coordinates
        self.correspondence_level = correspondence_level
        in_channels = 3 + (2 if coordinates else 0)
        self.stem = conv_block(in_channels, c1)
        self.down2 = conv_block(c1, c2, stride=2)
        self.down4 = conv_block(c2, c4, stride=2)
        self.down8 = conv_block(c4, 2 * c4, stride=2)
        self.bottleneck = nn.Sequential(*[ResidualBlock(2 * c4) for _ in range(blocks)])
        self.correspondence_head = nn.Sequential(
            conv_block(channels[correspondence_level] + 2 * c4, c4),
            nn.Conv2d(c4, correspondence_channels, 3, padding=1),
        )

    def forward(self, pncc):
        """pncc: (B, 3, H, W) -> GeometryFeatures (shapes in its docstring)."""
        x = pncc
        if self.coordinates:
            batch, _, height, width = pncc.shape
            grid = pixel_grid(height, width, pncc.device, pncc.dtype).expand(batch, -1, -1, -1)
            x = torch.cat((pncc, grid), dim=1)
        f1 = self.stem(x)
        f2 = self.down2(f1)
        f4 = self.down4(f2)
        f8 = self.bottleneck(self.down8(f4))
        pyramid = (f1, f2, f4)
        skip = pyramid[self.correspondence_level]
        up = F.interpolate(f8, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        correspondence = self.correspondence_head(torch.cat((skip, up), dim=1))
        return GeometryFeatures(pyramid, correspondence)


class AppearanceEncoder(nn.Module):
    """E_a: [source image (B,3,H,W) in [-1,1], source PNCC (B,3,H,W)] -> pyramid A_s.

    Args:
        channels: widths at full, 1/2 and 1/4 resolution.
        blocks: residual blocks at 1/4 resolution.

    Returns (forward): tuple of (B, channels[l], H / 2^l, W / 2^l) for levels l = 0, 1, 2.
    """

    def __init__(self, channels, blocks=1):
        super().__init__()
        c1, c2, c4 = channels
        self.stem = conv_block(6, c1)
        self.down2 = conv_block(c1, c2, stride=2)
        self.down4 = nn.Sequential(
            conv_block(c2, c4, stride=2), *[ResidualBlock(c4) for _ in range(blocks)])

    def forward(self, image, pncc):
        f1 = self.stem(torch.cat((image, pncc), dim=1))
        f2 = self.down2(f1)
        f4 = self.down4(f2)
        return f1, f2, f4
