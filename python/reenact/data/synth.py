"""Synthetic datasets rendered from the built-in toy head (``reenact synth``). Synthetic by construction.

Each clip has a random identity, smooth random expression trajectories and smooth head motion.
Frames are the toy head's procedural texture, shaded by one directional light, rendered with
``pncc_cuda.rasterize``/``interpolate`` over a random gradient background. The ground-truth
parameters are written in the prepared-dataset format (``FORMAT.md``), so the loaders and
training cannot tell a synthetic dataset from a prepared one, except by the ``synthetic`` flag.

``raw=True`` writes uncropped "raw" videos instead (head smaller, drifting across a wider frame),
each with a ``<name>.landmarks.npy`` of its true 68 landmarks: input for testing ``reenact prepare``.
"""
import math
import os
import pathlib

import numpy as np
import torch

from ..face3d.pncc import _ops
from ..face3d.pose import compose_pose, euler_to_matrix
from ..face3d.synthetic import project_landmarks
from ..face3d.toy import make_toy_head
from ..validation import is_int
from . import format as fmt
from .video import CODECS, check_codec, encode_video

_LIGHT = torch.tensor([-0.35, -0.45, 0.82])  # image space (y down, z towards the viewer)


def _smooth(rng, frames, amplitude, cycles=(0.3, 1.5)):
    """A smooth random trajectory: two sinusoids with random frequencies and phases."""
    t = np.arange(frames) / max(frames, 1)
    out = np.zeros(frames)
    for _ in range(2):
        frequency = rng.uniform(*cycles)
        out += rng.uniform(0.3, 0.7) * np.sin(2 * math.pi * (frequency * t + rng.uniform()))
    return amplitude * out


def random_clip_parameters(model, rng, frames, size, head_fraction=0.7, drift=0.0):
    """(alpha (Ki,), beta (T, Ke), pose (T, 3, 4)) float32 numpy for one clip of T frames.

    ``head_fraction`` is the head height over the image height; ``drift`` moves the head centre
    by up to that fraction of the image size over the clip.
    """
    alpha = rng.standard_normal(model.num_id).astype(np.float32)
    beta = np.stack([np.clip(_smooth(rng, frames, rng.uniform(0.3, 1.0)) + rng.uniform(-0.2, 0.3), 0.0, 1.0)
                     for _ in range(model.num_exp)], axis=1)
    yaw = rng.uniform(-12, 12) + _smooth(rng, frames, 20.0)
    pitch = rng.uniform(-5, 5) + _smooth(rng, frames, 10.0)
    roll = rng.uniform(-5, 5) + _smooth(rng, frames, 8.0)
    rotation = euler_to_matrix(torch.from_numpy(yaw), torch.from_numpy(pitch), torch.from_numpy(roll))
    extent = float(model.mean[:, 1].max() - model.mean[:, 1].min())
    scale = (head_fraction * rng.uniform(0.9, 1.05) + _smooth(rng, frames, 0.03)) * size[0] / extent
    centre_x = size[1] * (0.5 + rng.uniform(-0.03, 0.03)) + _smooth(rng, frames, drift * size[1])
    centre_y = size[0] * (0.5 + rng.uniform(-0.03, 0.03)) + _smooth(rng, frames, drift * size[0])
    # Model coordinates are centred on the head; pixel centres are integers, so the image centre is (n-1)/2.
    translation = torch.from_numpy(np.stack([centre_x - 0.5, centre_y - 0.5, np.zeros(frames)], -1))
    pose = compose_pose(rotation, torch.from_numpy(scale), translation)
    return alpha, beta.astype(np.float32), pose.numpy().astype(np.float32)


def _background(rng, height, width):
    low, high = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1.0) / 2.0
    return torch.from_numpy((low + (high - low) * ramp[..., None]).astype(np.float32)).permute(2, 0, 1)


def vertex_normals(vertices, faces):
    """Unit per-vertex normals (B, V, 3) of image-space meshes (area-weighted face normals)."""
    a, b, c = (vertices[:, faces[:, k]] for k in range(3))
    face_normals = torch.cross(b - a, c - a, dim=-1)
    normals = torch.zeros_like(vertices).index_add_(1, faces.reshape(-1), face_normals.repeat_interleave(3, dim=1))
    return torch.nn.functional.normalize(normals, dim=-1)


def render_toy_frames(model, alpha, beta, pose, height, width, background, chunk=16):
    """Shaded, textured renders of the toy head -> (T, H, W, 3) uint8 RGB."""
    faces = model.faces
    out = []
    with torch.no_grad():
        for start in range(0, beta.shape[0], chunk):
            stop = start + chunk
            vertices = model.image_vertices(torch.from_numpy(alpha)[None], torch.from_numpy(beta[start:stop]),
                                            torch.from_numpy(pose[start:stop]))
            normals = vertex_normals(vertices, faces)
            # Image space has y down and det(pose) < 0, so outward normals point to -z here; flip.
            shade = 0.35 + 0.65 * (-(normals @ _LIGHT)).clamp_min(0.0)
            colors = model.colors[None] * shade[..., None]
            ops = _ops()
            face_index, bary, _ = ops.rasterize(vertices.contiguous(), faces, height, width)
            image = ops.interpolate(colors.contiguous(), faces, face_index, bary).permute(0, 3, 1, 2)
            mask = (face_index >= 0)[:, None].to(image.dtype)
            image = image * mask + background * (1 - mask)
            out.append((image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def synth_dataset(out_dir, clips, *, frames=32, size=256, fps=25.0, codec="vp9", identities=None,
                  seed=0, raw=False, progress=None, model=None):
    """Render ``clips`` toy-head clips into ``out_dir``; returns the manifest records (or raw paths).

    Args:
        clips: number of clips; identities: number of distinct identities (default: one per clip),
            assigned round-robin so several clips can share one identity.
        frames, size, fps, codec: per clip; size must be even.
        raw: write uncropped raw videos plus ``.landmarks.npy`` files instead of a dataset.
        progress: optional callable called once per clip.
    """
    for name, value, low in (("clips", clips, 1), ("frames", frames, 2), ("size", size, 16)):
        if not is_int(value) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if size % 2:
        raise ValueError(f"size must be even (4:2:0 video), got {size}")
    identities = clips if identities is None else identities
    if not is_int(identities) or not 1 <= identities <= clips:
        raise ValueError(f"identities must be an int in [1, clips], got {identities!r}")
    check_codec(codec)
    model = model if model is not None else make_toy_head()
    out_dir = pathlib.Path(os.fspath(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    identity_alpha = [rng.standard_normal(model.num_id).astype(np.float32) for _ in range(identities)]
    suffix = CODECS[codec][1]
    height, width = (size, size) if not raw else (size, (size * 4 // 3) // 2 * 2)
    results = []
    for k in range(clips):
        clip_rng = np.random.default_rng([seed, k])
        _, beta, pose = random_clip_parameters(model, clip_rng, frames, (height, width),
                                               head_fraction=0.4 if raw else 0.7, drift=0.12 if raw else 0.0)
        alpha = identity_alpha[k % identities]
        images = render_toy_frames(model, alpha, beta, pose, height, width, _background(clip_rng, height, width))
        landmarks = project_landmarks(model, torch.from_numpy(alpha)[None], torch.from_numpy(beta),
                                      torch.from_numpy(pose)).numpy()
        name = f"synth_{k:05d}"
        if raw:
            video_path = out_dir / f"{name}{suffix}"
            encode_video(video_path, images, fps=fps, codec=codec)
            np.save(out_dir / f"{name}.landmarks.npy", landmarks.astype(np.float64))
            results.append(video_path)
        else:
            identity = f"synth-id{k % identities:04d}"
            (out_dir / "clips").mkdir(exist_ok=True)
            clip_rel, params_rel = f"clips/{name}{suffix}", f"clips/{name}.npz"
            encode_video(out_dir / clip_rel, images, fps=fps, codec=codec)
            fmt.save_params(out_dir / params_rel, alpha=alpha, pose=pose, beta=beta, landmarks=landmarks,
                            crop_box=np.tile(np.array([0, 0, size, size], np.float32), (frames, 1)),
                            valid=np.ones(frames, bool), identity=identity, model_name=model.name,
                            image_size=size)
            results.append(fmt.ClipRecord(clip=clip_rel, params=params_rel, frames=frames, fps=float(fps),
                                          identity=identity, source=f"synthetic:{name}", codec=codec,
                                          size=size, synthetic=True))
        if progress is not None:
            progress()
    if not raw:
        fmt.write_manifest(out_dir, results)
    return results
