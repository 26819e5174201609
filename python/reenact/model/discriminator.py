"""Multi-scale PatchGAN discriminator (pix2pixHD layout) on [image, P_d'].

Each scale returns its intermediate activations as well as its patch logits, because the
feature-matching loss compares them between the generated and the real image.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

__all__ = ["PatchDiscriminator", "MultiScaleDiscriminator"]

_NEGATIVE_SLOPE = 0.2
_MAX_CHANNELS = 512


class PatchDiscriminator(nn.Module):
    """One PatchGAN: `layers` stride-2 4x4 convs, one stride-1 conv, and a 1-channel logit conv.

    Args:
        in_channels: channels of its input (image + PNCC = 6).
        channels: width of the first layer, doubled per layer up to 512.
        layers: number of stride-2 convolutions.
        spectral_norm: spectral normalisation of every conv but the logits.

    Returns (forward): list of activations, the last being the logits (B, 1, h, w).
    """

    def __init__(self, in_channels, channels, layers, spectral_norm=True):
        super().__init__()

        def conv(c_in, c_out, stride, bias=True):
            layer = nn.Conv2d(c_in, c_out, 4, stride=stride, padding=2, bias=bias)
            return _spectral_norm(layer) if spectral_norm else layer

        # Instance norm everywhere but the first layer and the logits, as pix2pixHD and SPADE.
        stages = [nn.Sequential(conv(in_channels, channels, 2), nn.LeakyReLU(_NEGATIVE_SLOPE))]
        width = channels
        for index in range(1, layers + 1):
            next_width = min(width * 2, _MAX_CHANNELS)
            stride = 2 if index < layers else 1
            stages.append(nn.Sequential(
                # No bias: the instance norm right after it would subtract it again.
                conv(width, next_width, stride, bias=False),
                nn.InstanceNorm2d(next_width, affine=False),
                nn.LeakyReLU(_NEGATIVE_SLOPE),
            ))
            width = next_width
        stages.append(nn.Conv2d(width, 1, 4, stride=1, padding=2))
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class MultiScaleDiscriminator(nn.Module):
    """`scales` PatchGANs; scale s sees the input average-pooled s times by 2 (3x3, stride 2).

    Args:
        channels, layers, spectral_norm: as PatchDiscriminator.
        scales: number of PatchGANs.

    Returns (forward): for each scale, the list of its activations (logits last).
    """

    def __init__(self, channels, layers, scales, spectral_norm=True):
        super().__init__()
        self.discriminators = nn.ModuleList(
            [PatchDiscriminator(6, channels, layers, spectral_norm) for _ in range(scales)])

    def forward(self, image, pncc):
        """image: (B, 3, H, W) in [-1, 1]; pncc: (B, 3, H, W) P_d' in [0, 1]."""
        if image.shape != pncc.shape or image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(
                f"image and pncc must both have shape (B, 3, H, W), got {tuple(image.shape)} and "
                f"{tuple(pncc.shape)}")
        x = torch.cat((image, pncc.to(image.dtype)), dim=1)
        outputs = []
        for index, discriminator in enumerate(self.discriminators):
            if index > 0:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            outputs.append(discriminator(x))
        return outputs
