"""Synthetic ground truth for the fitter: random parameters and their exact projected landmarks.

Used by tests, benchmarks and ``reenact synth``. Everything here is synthetic by construction.
"""
import torch

from .pose import compose_pose, euler_to_matrix


def ground_truth_landmark_vertices(model):
    """(68,) vertex indices that define "true" landmarks on ``model``.

    Fixed landmarks are the model's own; a sliding outline landmark takes an evenly spaced
    candidate of its side (from the temple, every other candidate, down towards the chin), so the
    fitter's nearest-candidate search can find it exactly.
    """
    vertices = model.landmarks68.clone()
    if model.has_contours:
        right, left = model.contour_right.to(vertices.device), model.contour_left.to(vertices.device)
        picks = torch.linspace(2, min(right.numel(), left.numel()) - 2, 8).round().long()
        for k in range(8):
            if vertices[k] < 0:
                vertices[k] = right[picks[k]]
            if vertices[16 - k] < 0:
                vertices[16 - k] = left[picks[k]]
        if vertices[8] < 0:
            vertices[8] = right[-1]
    return vertices


def random_parameters(model, batch, *, generator=None, max_yaw=40.0, max_pitch=20.0, max_roll=15.0,
                      image_size=256, id_scale=1.0, exp_scale=0.5, share_identity=False):
    """Random identities, expressions and poses that put the face inside an image.

    Returns (alpha (B, Ki), beta (B, Ke), pose (B, 3, 4)) float32 on the model's device. Angles are
    uniform in +-max degrees; the head's half-height maps to about 0.35 of ``image_size``.
    """
    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)

    alpha = id_scale * torch.randn(1 if share_identity else batch, model.num_id, generator=generator, dtype=torch.float64)
    alpha = alpha.expand(batch, -1)
    beta = exp_scale * torch.rand(batch, model.num_exp, generator=generator, dtype=torch.float64)
    rotation = euler_to_matrix(uniform(-max_yaw, max_yaw, batch), uniform(-max_pitch, max_pitch, batch),
                               uniform(-max_roll, max_roll, batch))
    extent = (model.mean[:, 1].max() - model.mean[:, 1].min()).item()
    scale = uniform(0.6, 0.8, batch) * image_size / extent
    translation = torch.stack([uniform(0.45, 0.55, batch) * image_size, uniform(0.45, 0.55, batch) * image_size,
                               torch.zeros(batch, dtype=torch.float64)], -1)
    pose = compose_pose(rotation, scale, translation)
    device = model.device
    return alpha.float().to(device), beta.float().to(device), pose.float().to(device)


def project_landmarks(model, alpha, beta, pose, landmark_vertices=None):
    """Exact image positions (B, 68, 2) of the landmark vertices for the given parameters."""
    if landmark_vertices is None:
        landmark_vertices = ground_truth_landmark_vertices(model)
    vertices = model.image_vertices(alpha, beta, pose)
    return vertices[:, landmark_vertices.to(vertices.device), :2]
