"""The built-in real face model: mediapipe's 468-point face mesh as a licence-free morphable model.

``load_model("mediapipe")`` gives a :class:`MediapipeFaceModel`. It is a
:class:`~reenact.face3d.morphable.MorphableModel` whose identity and expression coefficients are
free per-vertex offsets (3 x 468 each, in model units = millimetres), so every function that takes
a model (``reconstruct_pncc``, ``render_model_pncc``, the geometric warp) works unchanged:

- triangles: mediapipe's ``FACEMESH_TESSELATION`` (shipped as edges; the triangles are its
  3-cycles), plus caps over the two eye openings and the mouth opening, which the tessellation
  leaves open. The mouth cap's faces are flagged in ``hole_faces``: they are the mouth interior.
- mean shape and NCC: ``face3d/data/mediapipe_face.npz`` (made by tools/make_mediapipe_face.py;
  mediapipe's pip package does not ship its canonical face model file).
- fit (:meth:`MediapipeFaceModel.fit_dense`): the face mesh points of each frame are brought to
  the model frame by a similarity Procrustes on the vertices that expressions barely move (pose
  per frame); a clip's identity is its mean model-frame mesh; a frame's expression is its residual.
  The fit reproduces the observed mesh exactly (the model has no prior to trade it against).
- identity-matched reconstruction, ``mean + alpha_src + beta_drv``: the driving expression is a
  deformation relative to the driving identity, in the model frame where every face has the
  mean shape's scale, so it is applied scaled to the source face.

What it cannot represent, unlike a 3DMM: no shape prior (a bad detection becomes a bad identity),
no separation of identity and expression within one photo (a single image's expression is part of
its identity, its expression is zero), no ears, neck, teeth or inside of the mouth, and no
semantic expression coefficients (beta is 1404 raw offsets, not blendshape weights).
"""
import functools
import pathlib

import numpy as np
import torch

from .detectors import MEDIAPIPE_TO_IBUG68
from .fit import FitResult, inter_ocular_distance
from .morphable import MorphableModel
from .pose import Y_FLIP, compose_pose, decompose_pose

NUM_VERTICES = 468
#: The outer eye corners (subject's right, left), which set the mean shape's scale.
OUTER_EYE_CORNERS = (33, 263)
DATA_FILE = pathlib.Path(__file__).with_name("data") / "mediapipe_face.npz"


def _connections():
    try:
        from mediapipe.python.solutions import face_mesh_connections  # optional dependency
    except ImportError as err:
        raise ImportError("the built-in 'mediapipe' face model needs `pip install mediapipe==0.10.21` "
                          "(numpy<2, protobuf<5)") from err
    return face_mesh_connections


def _vertices_of(edges):
    return sorted({v for edge in edges for v in edge})


def image_to_model_space(points):
    """mediapipe mesh points (V, 3) in pixels (x right, y down, z smaller = nearer) -> model axes
    (x right, y up, z towards the viewer), still in pixels."""
    return np.asarray(points, dtype=np.float64) * np.array([1.0, -1.0, -1.0])


def similarity_procrustes(source, target, weights):
    """Weighted similarity (s, R, t) with ``s * R @ source + t ~ target`` (Umeyama), R proper.

    source, target: (..., V, 3) tensors or arrays; weights (V,) or (..., V). Returns tensors
    (or arrays, for array input) s (...,), R (..., 3, 3), t (..., 3).
    """
    as_numpy = not torch.is_tensor(source)
    source, target, weights = (torch.as_tensor(np.asarray(x) if as_numpy else x, dtype=torch.float64)
                               for x in (source, target, weights))
    weights = (weights / weights.sum(-1, keepdim=True))[..., None]
    source_mean = (weights * source).sum(-2, keepdim=True)
    target_mean = (weights * target).sum(-2, keepdim=True)
    src, tgt = source - source_mean, target - target_mean
    covariance = (weights * tgt).transpose(-1, -2) @ src  # (..., 3, 3)
    u, sigma, vh = torch.linalg.svd(covariance)
    fix = torch.ones_like(sigma)
    fix[..., 2] = torch.sign(torch.linalg.det(u @ vh))
    rotation = u @ (fix[..., :, None] * vh)
    variance = (weights * src * src).sum((-1, -2))
    scale = (sigma * fix).sum(-1) / variance
    translation = target_mean[..., 0, :] - scale[..., None] * (rotation @ source_mean[..., 0, :, None])[..., 0]
    if as_numpy:
        return scale.numpy(), rotation.numpy(), translation.numpy()
    return scale, rotation, translation


@functools.lru_cache(maxsize=1)
def tessellation_faces():
    """Triangles (F, 3) of mediapipe's face-mesh tessellation: the 3-cycles of its edge graph,
    less the two 3-cycles that bound no face (all three of their edges have two faces already)."""
    edges = {tuple(sorted(edge)) for edge in _connections().FACEMESH_TESSELATION}
    neighbours = {}
    for a, b in edges:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    cycles = sorted({tuple(sorted((a, b, c))) for a, b in edges for c in neighbours[a] & neighbours[b]})
    uses = {}
    for a, b, c in cycles:
        for edge in ((a, b), (a, c), (b, c)):
            uses[edge] = uses.get(edge, 0) + 1
    faces = [t for t in cycles if not all(uses[e] > 2 for e in ((t[0], t[1]), (t[0], t[2]), (t[1], t[2])))]
    return np.array(faces, dtype=np.int64)


def boundary_loops(faces):
    """The closed boundary loops (lists of vertices, in walking order) of a triangle list."""
    uses = {}
    for a, b, c in faces:
        for edge in ((a, b), (b, c), (c, a)):
            key = tuple(sorted(edge))
            uses[key] = uses.get(key, 0) + 1
    following = {}
    for a, b in (edge for edge, count in uses.items() if count == 1):
        following.setdefault(a, []).append(b)
        following.setdefault(b, []).append(a)
    loops, seen = [], set()
    for start in sorted(following):
        if start in seen:
            continue
        loop, previous, current = [start], None, start
        while True:
            seen.add(current)
            step = [v for v in following[current] if v != previous][0]
            if step == start:
                break
            loop.append(step)
            previous, current = current, step
        loops.append(loop)
    return loops


def ear_clip(loop, points):
    """Triangulate a simple polygon (vertex ids in order) by ear clipping its 2-D ``points``."""
    loop = list(loop)
    xy = {v: points[v] for v in loop}
    area = sum(xy[a][0] * xy[b][1] - xy[b][0] * xy[a][1] for a, b in zip(loop, loop[1:] + loop[:1]))
    if area < 0:
        loop.reverse()

    def cross(o, a, b):
        return (xy[a][0] - xy[o][0]) * (xy[b][1] - xy[o][1]) - (xy[a][1] - xy[o][1]) * (xy[b][0] - xy[o][0])

    triangles = []
    while len(loop) > 3:
        for i in range(len(loop)):
            a, b, c = loop[i - 1], loop[i], loop[(i + 1) % len(loop)]
            if cross(a, b, c) <= 0:
                continue
            inside = any(cross(a, b, p) >= 0 and cross(b, c, p) >= 0 and cross(c, a, p) >= 0
                         for p in loop if p not in (a, b, c))
            if not inside:
                triangles.append((a, b, c))
                del loop[i]
                break
        else:  # numerically degenerate: fan the rest
            triangles += [(loop[0], loop[k], loop[k + 1]) for k in range(1, len(loop) - 1)]
            break
    triangles.append(tuple(loop))
    return triangles


def orient(faces, points):
    """Faces reordered counter-clockwise when seen from +z (the viewer), in x-right, y-up axes."""
    corners = points[faces]
    area = np.cross(corners[:, 1, :2] - corners[:, 0, :2], corners[:, 2, :2] - corners[:, 0, :2])
    return np.where((area < 0)[:, None], faces[:, [0, 2, 1]], faces)


def load_mean_shape():
    with np.load(DATA_FILE, allow_pickle=False) as data:
        return data["mean"].astype(np.float32), data["mirror"].astype(np.int64)


class MediapipeFaceModel(MorphableModel):
    """mediapipe's face mesh as a morphable model with per-vertex identity and expression offsets.

    Extra attributes: ``hole_faces`` (F,) bool, the mouth-interior cap; ``rigid_weights`` (V,)
    float32, the Procrustes weight of each vertex (0 on the lips, jaw, eyes and brows);
    ``mirror`` (V,) int64, each vertex's left-right counterpart; ``regions``: dict of named
    vertex-index lists (lips, eyes, brows, upper and lower lids) for scripted expressions.
    """

    dense = True

    def fit_dense(self, points, clip_index=None):
        """Fit face-mesh points (N, >=468, 3) in image pixels (mediapipe's x, y, z) -> FitResult.

        clip_index: (N,) clip of each frame (frames of a clip share one identity); default one clip.
        """
        points = torch.as_tensor(np.asarray(points), dtype=torch.float64)
        if points.ndim != 3 or points.shape[1] < NUM_VERTICES or points.shape[2] != 3:
            raise ValueError(f"face-mesh points must be (N, >=468, 3), got {tuple(points.shape)}")
        if not torch.isfinite(points).all():
            raise ValueError("face-mesh points must be finite")
        frames = points.shape[0]
        observed = points[:, :NUM_VERTICES] * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
        clip_index = (torch.zeros(frames, dtype=torch.int64) if clip_index is None
                      else torch.as_tensor(np.asarray(clip_index), dtype=torch.int64))
        if clip_index.shape != (frames,) or (clip_index < 0).any():
            raise ValueError(f"clip_index must be ({frames},) non-negative ints")
        mean = self.mean.cpu().double()
        # Pose: the similarity that takes each observed mesh onto the mean shape's rigid part.
        scale, rotation, translation = similarity_procrustes(observed, mean[None].expand(frames, -1, -1),
                                                             self.rigid_weights.cpu().double())
        canonical = scale[:, None, None] * observed @ rotation.transpose(-1, -2) + translation[:, None]
        clips = int(clip_index.max()) + 1
        sums = torch.zeros(clips, NUM_VERTICES, 3, dtype=torch.float64).index_add_(0, clip_index, canonical)
        counts = torch.bincount(clip_index, minlength=clips).clamp_min(1).double()
        identity = sums / counts[:, None, None]
        clip_alpha = (identity - mean).flatten(1)
        alpha = clip_alpha[clip_index]
        beta = (canonical - identity[clip_index]).flatten(1)
        # model -> image: image = F @ (R^T (model - t) / s), written as [s' * F @ R' | t'].
        model_rotation = rotation.transpose(-1, -2)
        model_scale = 1.0 / scale
        flip = torch.tensor(Y_FLIP, dtype=torch.float64)
        image_translation = -flip * (model_rotation @ translation[..., None])[..., 0] * model_scale[:, None]
        image_translation[:, 2] = 0.0  # the project's convention: poses carry no depth offset
        pose = compose_pose(model_rotation, model_scale, image_translation).float()
        fitted = (canonical.float() @ pose[:, :, :3].transpose(-1, -2) + pose[:, None, :, 3])
        landmark_index = self.landmarks68.cpu()
        projected = fitted[:, landmark_index, :2]
        observed_landmarks = points[:, landmark_index, :2].float()
        residuals = projected - observed_landmarks
        rms_px = residuals.pow(2).sum(-1).mean(-1).sqrt()
        rms_iod = rms_px / inter_ocular_distance(observed_landmarks).clamp_min(1e-6)
        rotation_out, scale_out, translation_out = decompose_pose(pose)
        return FitResult(
            alpha=alpha.float(), clip_alpha=clip_alpha.float(), beta=beta.float(), pose=pose,
            rotation=rotation_out, scale=scale_out, translation=translation_out, projected=projected,
            residuals=residuals, rms_px=rms_px, rms_iod=rms_iod,
            ok=torch.isfinite(rms_px) & (rms_iod < 0.05),
            landmark_vertices=landmark_index[None].expand(frames, -1).clone(), iterations=1,
        )

    def vertices(self, alpha, beta=None):
        """``mean + alpha + beta`` as (B, V, 3): the bases are identities, so no product is needed
        (the generic einsum with the 1404 x 1404 identity cost 2 ms a call)."""
        alpha, beta = self.check_coefficients(alpha, beta)
        return self.mean + (alpha + beta).view(-1, self.num_vertices, 3)


def _rigid_weights(mean, regions, faces):
    """1 on vertices that expressions barely move: above the nose base and away from the eyes
    and brows (and their one-ring); 0 elsewhere."""
    moving = set(regions["lips"]) | set(regions["right_eye"]) | set(regions["left_eye"]) | \
        set(regions["right_brow"]) | set(regions["left_brow"])
    ring = set(moving)
    for face in faces:
        if moving & set(face.tolist()):
            ring |= set(face.tolist())
    nose_base = mean[2, 1]
    weights = np.array([1.0 if (mean[v, 1] > nose_base and v not in ring) else 0.0
                        for v in range(len(mean))], dtype=np.float32)
    return weights


@functools.lru_cache(maxsize=1)
def _model_arrays():
    connections = _connections()
    mean, mirror = load_mean_shape()
    skin = orient(tessellation_faces(), mean)
    regions = {
        "lips": _vertices_of(connections.FACEMESH_LIPS),
        "right_eye": _vertices_of(connections.FACEMESH_RIGHT_EYE),
        "left_eye": _vertices_of(connections.FACEMESH_LEFT_EYE),
        "right_brow": _vertices_of(connections.FACEMESH_RIGHT_EYEBROW),
        "left_brow": _vertices_of(connections.FACEMESH_LEFT_EYEBROW),
        "oval": _vertices_of(connections.FACEMESH_FACE_OVAL),
    }
    caps, holes = [], []
    oval = set(regions["oval"])
    for loop in boundary_loops(skin):
        if set(loop) <= oval:
            continue  # the face outline is the mesh's border, not an opening
        triangles = ear_clip(loop, mean[:, :2])
        caps += triangles
        holes += [set(loop) <= set(regions["lips"])] * len(triangles)
    faces = np.concatenate([skin, orient(np.array(caps, dtype=np.int64), mean)])
    hole_faces = np.concatenate([np.zeros(len(skin), bool), np.array(holes, bool)])
    for side in ("right", "left"):  # upper and lower lid: eye-loop vertices above / below its centre
        eye = regions[f"{side}_eye"]
        centre = mean[eye, 1].mean()
        regions[f"{side}_upper_lid"] = [v for v in eye if mean[v, 1] > centre]
        regions[f"{side}_lower_lid"] = [v for v in eye if mean[v, 1] <= centre]
    return mean, mirror, faces, hole_faces, regions, _rigid_weights(mean, regions, skin), MEDIAPIPE_TO_IBUG68


#: The model's ``name`` (what a prepared dataset's parameter files record as ``model_name``).
MEDIAPIPE_NAME = "mediapipe face mesh (built-in, Apache-2.0)"


def make_mediapipe_model():
    """The built-in real face model (see the module docstring)."""
    mean, mirror, faces, hole_faces, regions, rigid, ibug68 = _model_arrays()
    basis = torch.eye(3 * NUM_VERTICES).reshape(NUM_VERTICES, 3, 3 * NUM_VERTICES)
    model = MediapipeFaceModel(
        mean=mean, id_basis=basis, exp_basis=basis, faces=faces, landmarks68=np.array(ibug68),
        name=MEDIAPIPE_NAME,
        exp_names=[f"offset{v}{axis}" for v in range(NUM_VERTICES) for axis in "xyz"],
    )
    model.hole_faces = torch.from_numpy(hole_faces)
    model.rigid_weights = torch.from_numpy(rigid)
    model.mirror = torch.from_numpy(mirror)
    model.regions = {name: list(vertices) for name, vertices in regions.items()}
    return model


__all__ = ["NUM_VERTICES", "MediapipeFaceModel", "make_mediapipe_model", "similarity_procrustes",
           "image_to_model_space", "tessellation_faces"]
