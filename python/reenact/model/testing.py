"""Synthetic inputs for the model's tests and benchmarks: ellipsoid "faces" whose colour is a
function of PNCC.

The PNCC of a face is the normalised (u, v, depth) position on an ellipsoid centred at a given
place; the image paints a fixed texture over (u, v). A driving frame moves the face, so the
ground truth is a pure warp of the source: the task a correspondence can learn.
"""
import torch


def synthetic_face(centres, resolution, radius=0.45):
    """centres: (B, 2) face centres (x, y) in [-1, 1] -> (image (B,3,R,R) in [-1,1],
    pncc (B,3,R,R) in [0,1])."""
    coords = (torch.arange(resolution, dtype=torch.float32) * 2 + 1) / resolution - 1
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    u = (x[None] - centres[:, 0, None, None]) / radius
    v = (y[None] - centres[:, 1, None, None]) / radius
    inside = (u**2 + v**2 < 1).float()
    depth = torch.sqrt((1 - u**2 - v**2).clamp(min=0))
    pncc = torch.stack(((u + 1) / 2, (v + 1) / 2, depth), dim=1) * inside[:, None]
    texture = torch.stack((
        torch.sin(3.0 * u) * 0.8,
        torch.cos(4.0 * v) * 0.8,
        torch.sin(2.0 * (u + v)) * 0.8,
    ), dim=1)
    background = torch.tensor([-0.5, 0.2, 0.6]).view(1, 3, 1, 1)
    image = texture * inside[:, None] + background * (1 - inside[:, None])
    return image, pncc


def synthetic_batch(batch, resolution, seed=0, shift=0.15):
    """A dict of source_image, source_pncc, driving_image, driving_pncc (source and driving face
    centres differ by up to `shift` in each direction)."""
    generator = torch.Generator().manual_seed(seed)
    source_centres = (torch.rand(batch, 2, generator=generator) - 0.5) * 0.2
    driving_centres = source_centres + (torch.rand(batch, 2, generator=generator) * 2 - 1) * shift
    source_image, source_pncc = synthetic_face(source_centres, resolution)
    driving_image, driving_pncc = synthetic_face(driving_centres, resolution)
    return {
        "source_image": source_image, "source_pncc": source_pncc,
        "driving_image": driving_image, "driving_pncc": driving_pncc,
    }
