"""Scripted expressions and head motion for the built-in mediapipe face model (the demo's driver).

Each expression is a per-vertex offset field (V, 3) in model millimetres, built from the face
mesh's named regions: ``smile`` (mouth corners up and out), ``open_mouth`` (the jaw and lower lip
turn down about a hinge below the ears), ``raise_brows`` (brows and forehead up) and ``blink``
(upper lids down onto the lower lids). Offsets add to a face's expression coefficients directly:
the model's beta is exactly such a field, flattened.

:data:`SCRIPT` strings them into keyframes with yaw ("turn") and pitch ("nod");
:func:`script_parameters` samples it into per-frame (beta, pose) for a fitted face.
"""
import numpy as np
import torch

from .pose import compose_pose, decompose_pose, euler_to_matrix

#: mediapipe face-mesh vertices of the lower lip (outer and inner contours, corners excluded).
LOWER_LIP = (146, 91, 181, 84, 17, 314, 405, 321, 375, 95, 88, 178, 87, 14, 317, 402, 318, 324)
#: ... and of the upper lip.
UPPER_LIP = (185, 40, 39, 37, 0, 267, 269, 270, 409, 191, 80, 81, 82, 13, 312, 311, 310, 415)
#: The mouth corners (outer right, outer left, inner right, inner left).
MOUTH_CORNERS = (61, 291, 78, 308)
EXPRESSIONS = ("smile", "open_mouth", "raise_brows", "blink")

#: Keyframes: (name, frames to reach it, {expression: weight}, yaw degrees, pitch degrees).
SCRIPT = (
    ("neutral", 1, {}, 0.0, 0.0),
    ("smile", 8, {"smile": 1.0}, 0.0, 0.0),
    ("neutral", 6, {}, 0.0, 0.0),
    ("open mouth", 8, {"open_mouth": 1.0}, 0.0, 0.0),
    ("neutral", 6, {}, 0.0, 0.0),
    ("raise brows", 8, {"raise_brows": 1.0}, 0.0, 0.0),
    ("neutral", 6, {}, 0.0, 0.0),
    ("blink", 3, {"blink": 1.0}, 0.0, 0.0),
    ("neutral", 3, {}, 0.0, 0.0),
    ("turn left", 8, {}, 25.0, 0.0),
    ("turn right", 12, {}, -25.0, 0.0),
    ("neutral", 8, {}, 0.0, 0.0),
    ("nod down", 6, {}, 0.0, -15.0),
    ("nod up", 8, {}, 0.0, 12.0),
    ("neutral", 6, {}, 0.0, 0.0),
)


def _smooth(t):
    return t * t * (3.0 - 2.0 * t)


def falloff(points, centres, radius):
    """exp(-d^2 / 2r^2) of each point's distance to the nearest centre -> (V,)."""
    distance = np.sqrt(((points[:, None] - centres[None]) ** 2).sum(-1)).min(1)
    return np.exp(-0.5 * (distance / radius) ** 2)


def expression_offsets(model):
    """{name: (V, 3) float32 offsets in model units} for the scripted expressions of ``model``
    (a :class:`~reenact.face3d.mediapipe_face.MediapipeFaceModel`)."""
    mean = model.mean.cpu().numpy().astype(np.float64)
    regions = model.regions
    offsets = {}

    corners = mean[list(MOUTH_CORNERS)]
    smile = np.zeros_like(mean)
    for corner in corners:
        weight = falloff(mean, corner[None], 9.0)
        smile += weight[:, None] * np.array([np.sign(corner[0]) * 4.0, 5.0, -1.0])
    offsets["smile"] = smile

    # Jaw: the lower lip and everything below the mouth (fully from 8 mm below the lower inner
    # lip's middle) turn down about a hinge at ear level, far behind the face; the upper lip stays.
    lip_y = mean[14, 1]
    jaw = _smooth(np.clip((lip_y + 4.0 - mean[:, 1]) / 12.0, 0.0, 1.0))
    jaw[list(LOWER_LIP)] = 1.0
    jaw[list(UPPER_LIP)] = 0.0
    jaw[list(MOUTH_CORNERS)] = 0.5
    hinge = np.array([0.0, mean[list(regions["right_eye"]), 1].mean() - 25.0, mean[:, 2].min() - 30.0])
    angle = np.deg2rad(14.0)
    # About the x axis, the front of the face (z above the hinge) going down.
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    turned = (mean - hinge) @ rotation.T + hinge
    offsets["open_mouth"] = jaw[:, None] * (turned - mean)

    brows = mean[list(regions["right_brow"]) + list(regions["left_brow"])]
    above_eyes = _smooth(np.clip((mean[:, 1] - mean[list(regions["right_eye"]), 1].max()) / 6.0, 0.0, 1.0))
    raise_brows = np.zeros_like(mean)
    raise_brows[:, 1] = 6.0 * falloff(mean, brows, 14.0) * above_eyes
    offsets["raise_brows"] = raise_brows

    blink = np.zeros_like(mean)
    for side in ("right", "left"):
        upper, lower = regions[f"{side}_upper_lid"], regions[f"{side}_lower_lid"]
        order = np.argsort(mean[lower, 0])
        lower_x, lower_y = mean[lower, 0][order], mean[lower, 1][order]
        gap = mean[upper, 1] - np.interp(mean[upper, 0], lower_x, lower_y)  # > 0: the lid's drop
        weight = falloff(mean, mean[upper], 3.0) * (mean[:, 1] >= lower_y.min())
        nearest = np.sqrt(((mean[:, None] - mean[upper][None]) ** 2).sum(-1)).argmin(1)
        blink[:, 1] -= weight * gap[nearest] * 0.95
    offsets["blink"] = blink
    return {name: value.astype(np.float32) for name, value in offsets.items()}


def script_keyframes(script=SCRIPT):
    """The script sampled per frame -> (labels list, weights (T, E), yaw (T,), pitch (T,))."""
    labels, weights, yaw, pitch = [], [], [], []
    previous = np.zeros(len(EXPRESSIONS)), 0.0, 0.0
    for label, frames, expression, target_yaw, target_pitch in script:
        unknown = set(expression) - set(EXPRESSIONS)
        if unknown:
            raise ValueError(f"unknown scripted expressions {sorted(unknown)}; known: {EXPRESSIONS}")
        target = np.array([expression.get(name, 0.0) for name in EXPRESSIONS]), target_yaw, target_pitch
        for step in range(1, frames + 1):
            t = _smooth(step / frames)
            labels.append(label)
            weights.append(previous[0] + t * (target[0] - previous[0]))
            yaw.append(previous[1] + t * (target[1] - previous[1]))
            pitch.append(previous[2] + t * (target[2] - previous[2]))
        previous = target
    return labels, np.array(weights), np.array(yaw), np.array(pitch)


def script_parameters(model, beta_src, pose_src, script=SCRIPT):
    """Per-frame driving parameters that play ``script`` on a fitted face.

    Args:
        model: the mediapipe face model; beta_src (Ke,) and pose_src (3, 4): the face's fit.
    Returns:
        dict with ``beta`` (T, Ke), ``pose`` (T, 3, 4) (the source pose turned by the script's yaw
        and pitch about the camera's vertical and horizontal axes), ``labels`` (T,) and ``weights`` (T, E).
    """
    labels, weights, yaw, pitch = script_keyframes(script)
    offsets = expression_offsets(model)
    fields = torch.from_numpy(np.stack([offsets[name].reshape(-1) for name in EXPRESSIONS]))  # (E, 3V)
    beta = beta_src.reshape(1, -1).float() + torch.from_numpy(weights).float() @ fields
    rotation, scale, translation = decompose_pose(pose_src.reshape(1, 3, 4).float())
    turn = euler_to_matrix(torch.from_numpy(yaw), torch.from_numpy(pitch), torch.zeros(len(yaw))).float()
    # Turned about the camera's axes (left-right and up-down in the picture), whatever the head's tilt.
    pose = compose_pose(turn @ rotation, scale.expand(len(yaw)), translation.expand(len(yaw), -1))
    return {"beta": beta, "pose": pose, "labels": labels, "weights": weights}
