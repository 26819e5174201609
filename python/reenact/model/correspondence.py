"""Dense correspondence by corr_warp, and the flow helpers of the feature transformation.

Coordinates follow `torch.nn.functional.grid_sample` with align_corners=False: a flow is a
(B, 2, h, w) map of (x, y) source positions normalised to [-1, 1], where -1 and 1 are the outer
edges of the image, so pixel j of a row of width w sits at (2j + 1) / w - 1. Such coordinates
do not depend on the resolution, which is what lets a 1/4-scale flow warp full-scale features.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .ops import get_ops

__all__ = [
    "Correspondence",
    "pixel_grid",
    "resize_flow",
    "warp_image",
    "warp_with_flow",
]


def pixel_grid(height, width, device=None, dtype=torch.float32):
    """The identity flow: (1, 2, height, width), channel 0 = x, channel 1 = y, in [-1, 1]."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=device, dtype=torch.float32) * 2 + 1) / width - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y)).unsqueeze(0).to(dtype)


def resize_flow(flow, size):
    """Resample a flow (B, 2, h, w) to size (H, W): bilinear up, area average down.

    The displacement from the identity is resampled, not the coordinates themselves: bilinear
    interpolation clamps at the border, which would bend the identity near the edges, whereas a
    clamped displacement keeps an identity flow exactly the identity at every scale.
    """
    height, width = size
    if tuple(flow.shape[-2:]) == (height, width):
        return flow
    identity = pixel_grid(flow.shape[-2], flow.shape[-1], flow.device, flow.dtype)
    if height <= flow.shape[-2] and width <= flow.shape[-1]:
        displacement = F.adaptive_avg_pool2d(flow - identity, (height, width))
    else:
        displacement = F.interpolate(
            flow - identity, size=(height, width), mode="bilinear", align_corners=False)
    return displacement + pixel_grid(height, width, flow.device, flow.dtype)


def warp_with_flow(features, flow):
    """Sample `features` (B, C, H, W) at the source positions `flow` (B, 2, H, W); bilinear.

    Positions outside the image take the border value: a face part warped from the edge of the
    crop is better approximated by the edge than by zeros, which the decoder would read as black.
    """
    if features.shape[-2:] != flow.shape[-2:]:
        raise ValueError(
            f"features and flow must have the same height and width, got "
            f"{tuple(features.shape)} and {tuple(flow.shape)}"
        )
    grid = flow.permute(0, 2, 3, 1).to(features.dtype)
    # torch's CPU grid_sample backward segfaults on NaN positions with border padding (torch
    # 2.14): a diverged run must reach the trainer's non-finite-loss check, not kill the process.
    # A NaN flow comes from NaN features, which reach the output through other paths anyway.
    grid = torch.nan_to_num(grid, nan=0.0)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def warp_image(image, flow):
    """Warp a full-resolution image (B, C, H, W) with a coarser flow (B, 2, h, w), e.g. the
    source image with Reenactor's 1/4-scale flow, for display next to the output."""
    return warp_with_flow(image, resize_flow(flow, image.shape[-2:]))


def _rows(x):
    # (B, C, h, w) -> (B, h*w, C). A view for channels_last tensors, one copy otherwise.
    batch, channels = x.shape[:2]
    return x.permute(0, 2, 3, 1).reshape(batch, -1, channels)


class Correspondence(nn.Module):
    """Warps source values to the driving layout with one corr_warp call, and returns the flow.

    For every driving position, corr_warp averages the source values with the weights
    softmax(cos(driving feature, source feature) / temperature) over all source positions. The
    source pixel grid is appended to the value as two channels, so the same weights also give
    the expected source position of every driving position: the flow.

    Args:
        temperature: softmax temperature (CoCosNet: 0.01).
        ops: "fused" or "reference" (reenact.model.ops).
    """

    def __init__(self, temperature=0.01, ops="fused"):
        super().__init__()
        self.temperature = float(temperature)
        self.set_ops(ops)

    def set_ops(self, ops):
        """Switch between the fused and the reference corr_warp."""
        self.ops = get_ops(ops)

    def forward(self, driving_features, source_features, source_values):
        """
        Args:
            driving_features: (B, C, h, w), the query (E_g of the driving PNCC).
            source_features: (B, C, h, w), the key (E_g of the source PNCC).
            source_values: (B, Cv, h, w), what is warped (appearance features, RGB, PNCC).

        Returns:
            warped: (B, Cv, h, w), the source values in the driving layout.
            flow: (B, 2, h, w), the expected source position (x, y) of every driving position,
                in grid_sample coordinates (see `pixel_grid`).

        Everything is computed in the dtype of `driving_features` (bfloat16 under autocast:
        corr_warp accumulates in float32, and the flow's bfloat16 rounding, 2^-8 of the [-1, 1]
        range, is an eighth of a 1/4-scale cell at 256x256).
        """
        if driving_features.dim() != 4:
            raise ValueError(
                f"driving_features must have shape (B, C, h, w), got "
                f"{tuple(driving_features.shape)}")
        if source_features.shape != driving_features.shape:
            raise ValueError(
                f"source_features must have the shape of driving_features "
                f"{tuple(driving_features.shape)}, got {tuple(source_features.shape)}")
        batch, _, height, width = driving_features.shape
        if source_values.dim() != 4 or source_values.shape[0] != batch or tuple(
                source_values.shape[-2:]) != (height, width):
            raise ValueError(
                f"source_values must have shape (B, Cv, h, w) = ({batch}, Cv, {height}, {width}), "
                f"got {tuple(source_values.shape)}")
        dtype = driving_features.dtype
        grid = pixel_grid(height, width, source_values.device, dtype).expand(batch, -1, -1, -1)
        values = torch.cat((source_values.to(dtype), grid), dim=1)
        warped_rows = self.ops.corr_warp(
            _rows(driving_features), _rows(source_features.to(dtype)), _rows(values),
            self.temperature)
        warped = warped_rows.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        return warped[:, :-2], warped[:, -2:]

    def extra_repr(self):
        return f"temperature={self.temperature}, ops={self.ops.name!r}"
