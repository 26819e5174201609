"""Overlays for checking fits by eye: PNCC blended over the photo, landmarks drawn on top."""
import numpy as np

from .pncc import render_model_pncc


def render_fit_pncc(model, alpha, beta, pose, height, width):
    """PNCC (B, 3, H, W) and mask (B, 1, H, W) of fitted parameters in the input image's pixels."""
    return render_model_pncc(model, model.image_vertices(alpha, beta, pose), height, width)


def _draw_points(canvas, points, color, radius):
    height, width = canvas.shape[:2]
    for x, y in np.asarray(points):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        col, row = int(round(x)), int(round(y))
        r0, r1 = max(row - radius, 0), min(row + radius + 1, height)
        c0, c1 = max(col - radius, 0), min(col + radius + 1, width)
        if r0 < r1 and c0 < c1:
            canvas[r0:r1, c0:c1] = color


def overlay(image_rgb, pncc, mask, observed=None, fitted=None, opacity=0.5):
    """Blend one PNCC (3, H, W) over an (H, W, 3) uint8 image; draw observed landmarks in green
    and fitted ones in red. Returns a new (H, W, 3) uint8 image."""
    image = image_rgb.astype(np.float32) / 255.0
    code = pncc.detach().cpu().permute(1, 2, 0).numpy()
    alpha = opacity * mask.detach().cpu()[0].numpy()[..., None]
    canvas = image * (1 - alpha) + code * alpha
    radius = max(1, round(min(image.shape[:2]) / 300))
    if observed is not None:
        _draw_points(canvas, observed, (0.1, 1.0, 0.1), radius)
    if fitted is not None:
        _draw_points(canvas, fitted, (1.0, 0.1, 0.1), radius)
    return (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)


def pncc_to_uint8(pncc):
    """(3, H, W) PNCC in [0, 1] -> (H, W, 3) uint8."""
    return (pncc.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


__all__ = ["render_fit_pncc", "overlay", "pncc_to_uint8"]
