"""Meshes for tests, benchmarks and demos of the rasterizer ops.

`face_mesh(num_faces)` gives a real face mesh from ../shared/data/face-models when that folder
exists (it is not part of the package; PNCC_SHARED_DATA points elsewhere), and otherwise a
generated stand-in with exactly the same triangle count, so that workloads stay comparable.
Every mesh comes back in image space: x right and y down in pixels, larger z nearer.
"""
import math
import os
import pathlib
from dataclasses import dataclass

import numpy as np
import torch

# The two real face meshes of the benchmark workload: 3DDFA_V2's BFM mesh and 3DDFA's full BFM.
REAL_FACE_MESHES = {
    76073: ("bfm_mean_3ddfa.npz", "mean_38365", "faces_76073"),
    105840: ("bfm_mean_3ddfa.npz", "mean_53215", "faces_105840"),
}


@dataclass
class Mesh:
    vertices: torch.Tensor  # (V, 3) float32, image space
    faces: torch.Tensor  # (F, 3) int32
    ncc: torch.Tensor  # (V, 3) float32 in [0, 1]: the normalised coordinate code
    source: str  # where it came from, for benchmark tables

    def batch(self, size):
        return self.vertices.unsqueeze(0).expand(size, -1, -1).contiguous()


def face_models_dir():
    default = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return pathlib.Path(os.environ.get("PNCC_SHARED_DATA", default)) / "face-models"


def normalized_coordinate_code(points):
    """Per-axis min-max normalisation to [0, 1] (the NCC of a mean shape)."""
    lo, hi = points.amin(0), points.amax(0)
    return (points - lo) / (hi - lo).clamp_min(1e-12)


def to_image_space(points, size, width_fraction=0.6):
    """Model space (x right, y up, z towards the viewer) -> image space of a size x size image,
    centred, with the face spanning `width_fraction` of the width."""
    points = points - (points.amax(0) + points.amin(0)) / 2
    scale = width_fraction * size / float(points[:, 0].amax() - points[:, 0].amin())
    image = points * scale
    image[:, 1] = -image[:, 1]
    image[:, :2] += (size - 1) / 2
    return image


def rotation_y(degrees):
    """3x3 rotation about the vertical axis (a head turning left or right)."""
    a = math.radians(degrees)
    return torch.tensor(
        [[math.cos(a), 0.0, math.sin(a)], [0.0, 1.0, 0.0], [-math.sin(a), 0.0, math.cos(a)]]
    )


def rotation_x(degrees):
    """3x3 rotation about the horizontal axis (a head nodding up or down)."""
    a = math.radians(degrees)
    return torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, math.cos(a), -math.sin(a)], [0.0, math.sin(a), math.cos(a)]]
    )


def head_surface(num_faces):
    """A generated head-like surface (an ellipsoidal cap with a nose bump) with exactly
    `num_faces` triangles; model space, units of the face width."""
    cols = max(2, int(math.sqrt(num_faces / 2 * 0.8)))
    rows = max(2, math.ceil(num_faces / (2 * cols)))
    u = torch.linspace(-1, 1, cols + 1)
    v = torch.linspace(-1.2, 1.2, rows + 1)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    depth = torch.sqrt((1.3 - 0.5 * uu**2 - 0.35 * vv**2).clamp_min(0.05))
    nose = 0.35 * torch.exp(-((uu / 0.18) ** 2 + ((vv - 0.05) / 0.35) ** 2))
    points = torch.stack([0.5 * uu, 0.5 * vv, 0.5 * (depth + nose)], -1).reshape(-1, 3)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    top_left = (r * (cols + 1) + c).reshape(-1)
    quads = torch.stack([top_left, top_left + 1, top_left + cols + 1, top_left + cols + 2], -1)
    tris = torch.cat([quads[:, [0, 2, 1]], quads[:, [1, 2, 3]]], 0)
    return points, tris[:num_faces].int()


def face_mesh(num_faces=76073, size=256, yaw=0.0, pitch=0.0):
    """A face mesh of `num_faces` triangles in the image space of a size x size image.

    Uses the real mesh of ../shared/data/face-models when it is there, else a generated one of the
    same triangle count (and says so in `source`)."""
    spec = REAL_FACE_MESHES.get(num_faces)
    path = face_models_dir() / spec[0] if spec else None
    if path is not None and path.exists():
        data = np.load(path, allow_pickle=False)
        points = torch.from_numpy(data[spec[1]].astype(np.float32))
        faces = torch.from_numpy(data[spec[2]].astype(np.int32))
        source = f"real BFM mesh ({spec[0]}:{spec[2]})"
    else:
        points, faces = head_surface(num_faces)
        source = f"generated head surface, {num_faces} triangles"
    ncc = normalized_coordinate_code(points)
    centred = points - (points.amax(0) + points.amin(0)) / 2
    rotation = rotation_x(pitch) @ rotation_y(yaw)
    vertices = to_image_space(centred @ rotation.T, size)
    return Mesh(vertices.float().contiguous(), faces.contiguous(), ncc.float().contiguous(), source)


def random_triangles(num_faces, height, width, generator=None, max_size=None, dtype=torch.float32):
    """A soup of independent random triangles (3 vertices each) covering an image, with random
    depths: the overlapping-layers workload of the parity tests."""
    g = generator
    max_size = max_size or max(height, width) / 3
    centres = torch.rand(num_faces, 1, 2, generator=g, dtype=torch.float64)
    centres = centres * torch.tensor([width, height], dtype=torch.float64)
    offsets = (torch.rand(num_faces, 3, 2, generator=g, dtype=torch.float64) - 0.5) * max_size
    z = torch.rand(num_faces, 3, 1, generator=g, dtype=torch.float64) * 10
    vertices = torch.cat([centres + offsets, z], -1).reshape(-1, 3).to(dtype)
    faces = torch.arange(num_faces * 3, dtype=torch.int32).reshape(num_faces, 3)
    return vertices, faces


def peak_cpu_bytes(fn):
    """Peak of the CPU memory allocated while fn runs, from the profiler's allocation events.

    With profile_memory the profiler records every allocation and free (its size, signed, and its
    time), including the temporaries inside a fused op and on its worker threads; replaying them
    in time order gives the peak of live bytes above what existed before. (torch's private
    MemoryProfileTimeline gave the same peaks, but its data-flow pass asserts "version mismatch"
    on ordinary ops such as grid_sampler or nan_to_num, on some machines on every try.)
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    cpu = torch.autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == cpu]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
