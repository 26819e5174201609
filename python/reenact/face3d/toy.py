"""A built-in, procedural, synthetic morphable head. Needs no file.

The head is an ellipsoid (millimetres, x right, y up, z towards the viewer) sampled on a
latitude-longitude grid that is denser on the face, with a height field for nose, eye sockets,
brows, lips and chin. Everything is a smooth closed-form function of the grid angles, so the model
is deterministic and identical on every machine.

- identity: 10 smooth modes (head width/height/depth, jaw, nose, eye spacing, chin, ...),
  orthogonalised and scaled so that alpha ~ N(0, 1) moves vertices by at most a few millimetres;
- expression: jaw_open, smile, brow_raise, blink, pucker (coefficient 1 = full expression);
- 68 iBUG landmarks: grid vertices moved exactly onto a procedural 68-point template;
- a procedural texture (per-vertex colours: skin, lips, eyes, brows, hair).

It is labelled synthetic in its name, which every output that names the model carries.
"""
import math

import numpy as np

from .morphable import MorphableModel

TOY_NAME = "toy-head (synthetic)"
TOY_EXPRESSIONS = ("jaw_open", "smile", "brow_raise", "blink", "pucker")

# Head radii in millimetres (x half-width, y half-height, z half-depth).
_RADII = np.array([78.0, 105.0, 92.0])


def _landmark_template():
    """The 68 iBUG points in face coordinates (fx, fy) = (x / rx, y / ry), fy up. (68, 2)."""
    points = []
    for i in range(17):  # jaw, subject's right temple -> chin -> left temple
        a = math.pi * i / 16
        points.append((-0.80 * math.cos(a), 0.15 - 1.0 * math.sin(a)))
    for i in range(5):  # right brow, outer -> inner
        fx = -0.70 + 0.1375 * i
        points.append((fx, 0.38 + 0.06 * math.sin(math.pi * (i + 0.5) / 5)))
    for i in range(5):  # left brow, inner -> outer
        fx = 0.15 + 0.1375 * i
        points.append((fx, 0.38 + 0.06 * math.sin(math.pi * (i + 0.5) / 5)))
    points += [(0.0, 0.25), (0.0, 0.15), (0.0, 0.05), (0.0, -0.05)]  # nose bridge down to tip
    points += [(-0.14, -0.12), (-0.07, -0.14), (0.0, -0.15), (0.07, -0.14), (0.14, -0.12)]
    for side in (-1.0, 1.0):  # right eye then left eye, each in iBUG order
        outer, inner = 0.50 * side, 0.26 * side
        near, far = 0.33 * side, 0.42 * side
        if side < 0:   # 36 outer, 37-38 upper, 39 inner, 40-41 lower
            points += [(outer, 0.22), (far, 0.26), (near, 0.26), (inner, 0.22), (near, 0.18), (far, 0.18)]
        else:          # 42 inner, 43-44 upper, 45 outer, 46-47 lower
            points += [(inner, 0.22), (near, 0.26), (far, 0.26), (outer, 0.22), (far, 0.18), (near, 0.18)]
    points += [(-0.30, -0.40), (-0.20, -0.35), (-0.08, -0.32), (0.0, -0.33), (0.08, -0.32),
               (0.20, -0.35), (0.30, -0.40), (0.20, -0.47), (0.10, -0.50), (0.0, -0.51),
               (-0.10, -0.50), (-0.20, -0.47)]  # outer lips 48-59
    points += [(-0.24, -0.40), (-0.10, -0.38), (0.0, -0.38), (0.10, -0.38), (0.24, -0.40),
               (0.10, -0.42), (0.0, -0.42), (-0.10, -0.42)]  # inner lips 60-67
    return np.array(points)


def _gauss(fx, fy, cx, cy, sx, sy):
    return np.exp(-(((fx - cx) / sx) ** 2) - (((fy - cy) / sy) ** 2))


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _grid_angles(rows, cols):
    """Polar angle theta (from +y) and azimuth phi (0 = facing +z), denser on the face."""
    v = np.linspace(-1.0, 1.0, rows)
    # theta spans 0.06*pi .. 0.86*pi, centred on the face, with the density tripled there.
    theta = 0.5 * math.pi - 0.04 * math.pi + 0.4 * math.pi * (0.35 * v + 0.65 * v ** 3)
    u = np.linspace(-1.0, 1.0, cols, endpoint=False)
    phi = math.pi * (0.35 * u + 0.65 * u ** 3)
    return np.meshgrid(theta, phi, indexing="ij")


def _snap_landmarks(theta, phi, template):
    """Move, for each template point, the nearest unused vertex exactly onto it. Returns indices."""
    landmark_theta = np.arccos(np.clip(template[:, 1], -1, 1))
    landmark_phi = np.arcsin(np.clip(template[:, 0] / np.sin(landmark_theta), -1, 1))
    used = np.zeros(theta.shape, dtype=bool)
    indices = np.empty(len(template), dtype=np.int64)
    for k, (lt, lp) in enumerate(zip(landmark_theta, landmark_phi)):
        distance = (theta - lt) ** 2 + (np.sin(lt) * (phi - lp)) ** 2
        distance[used] = np.inf
        nearest = int(np.argmin(distance))
        used[nearest] = True
        theta[nearest], phi[nearest] = lt, lp
        indices[k] = nearest
    return indices


def make_toy_head(rows=56, cols=72):
    """Build the synthetic toy head (about rows*cols + 1 vertices; 4,033 by default)."""
    theta, phi = _grid_angles(rows, cols)
    theta, phi = theta.ravel().copy(), phi.ravel().copy()
    landmarks68 = _snap_landmarks(theta, phi, _landmark_template())
    # A top cap vertex closes the skull; the neck stays open.
    theta = np.append(theta, 0.0)
    phi = np.append(phi, 0.0)
    num_vertices = theta.size

    # Unit-ellipsoid coordinates and face coordinates.
    ux, uy, uz = np.sin(theta) * np.sin(phi), np.cos(theta), np.sin(theta) * np.cos(phi)
    fx, fy = ux, uy
    front = _sigmoid((uz - 0.25) * 12.0)
    ax = np.abs(fx)

    height = (
        0.22 * _gauss(fx, fy, 0.0, -0.06, 0.07, 0.10)         # nose tip
        + 0.12 * _gauss(fx, fy, 0.0, 0.12, 0.05, 0.16)        # nose bridge
        + 0.05 * _gauss(ax, fy, 0.12, -0.12, 0.05, 0.04)      # alae
        - 0.07 * _gauss(ax, fy, 0.38, 0.22, 0.13, 0.09)       # eye sockets
        + 0.03 * _gauss(ax, fy, 0.38, 0.22, 0.07, 0.035)      # eyeballs
        + 0.04 * _gauss(ax, fy, 0.40, 0.37, 0.25, 0.05)       # brow ridge
        + 0.05 * _gauss(fx, fy, 0.0, -0.41, 0.25, 0.07)       # lips
        + 0.06 * _gauss(fx, fy, 0.0, -0.78, 0.22, 0.10)       # chin
    ) * front
    mean = np.stack([ux * _RADII[0], uy * _RADII[1], (uz + height) * _RADII[2]], axis=1)

    id_basis = _identity_modes(ux, uy, uz, fx, fy, ax, front)
    exp_basis = _expression_modes(mean, fx, fy, ax, front)
    colors = _texture(fx, fy, ax, uz, front, theta)

    faces = []
    grid = np.arange(rows * cols).reshape(rows, cols)
    for r in range(rows - 1):
        for c in range(cols):
            a, b = grid[r, c], grid[r, (c + 1) % cols]
            d, e = grid[r + 1, c], grid[r + 1, (c + 1) % cols]
            faces += [(a, d, b), (b, d, e)]
    cap = num_vertices - 1
    faces += [(cap, grid[0, c], grid[0, (c + 1) % cols]) for c in range(cols)]
    return MorphableModel(
        mean=mean.astype(np.float32), id_basis=id_basis.astype(np.float32),
        exp_basis=exp_basis.astype(np.float32), faces=np.array(faces, dtype=np.int64),
        landmarks68=landmarks68, name=TOY_NAME, exp_names=TOY_EXPRESSIONS,
        colors=colors.astype(np.float32), synthetic=True,
    )


def _identity_modes(ux, uy, uz, fx, fy, ax, front):
    """(V, 3, 10) smooth identity modes, orthogonal in R^{3V}, each scaled to a peak displacement (mm)."""
    zeros = np.zeros_like(ux)
    raw = [
        (ux, zeros, zeros),                                              # head width
        (zeros, uy, zeros),                                              # head height
        (zeros, zeros, uz),                                              # head depth
        (ux * _sigmoid(-uy * 5.0), zeros, zeros),                        # jaw width
        (zeros, zeros, front * _gauss(fx, fy, 0.0, 0.0, 0.1, 0.2)),      # nose size
        (np.sign(fx) * front * _gauss(ax, fy, 0.38, 0.22, 0.15, 0.12), zeros, zeros),  # eye spacing
        (zeros, -front * _sigmoid(-(fy + 0.55) * 8.0), zeros),           # lower-face length
        (zeros, zeros, front * _gauss(fx, fy, 0.0, -0.78, 0.25, 0.12)),  # chin protrusion
        (zeros, zeros, np.clip(uy, 0, None) * uz),                       # forehead slope
        (ux * np.exp(-(((uy + 0.2) / 0.3) ** 2)), zeros, zeros),         # cheek fullness
    ]
    stack = np.stack([np.stack(mode, axis=1).ravel() for mode in raw], axis=1)  # (3V, K)
    q, _ = np.linalg.qr(stack)
    # Keep each mode's orientation the one its raw field gave (QR may flip signs).
    q *= np.sign(np.sum(q * stack, axis=0))
    # Scale by peak displacement, not RMS: local modes (nose, eyes) must stay plausible.
    peak_mm = np.array([8.0, 8.0, 7.0, 6.0, 5.0, 3.0, 5.0, 4.0, 5.0, 5.0])
    num_vertices = ux.size
    modes = q.reshape(num_vertices, 3, -1)
    peak = np.linalg.norm(modes, axis=1).max(axis=0)
    return modes * (peak_mm / peak)

def _expression_modes(mean, fx, fy, ax, front):
    """(V, 3, 5) expression displacements in mm; coefficient 1 = full expression."""
    num_vertices = mean.shape[0]
    modes = np.zeros((num_vertices, 3, len(TOY_EXPRESSIONS)))
    # jaw_open: the face below the lip line rotates 0.25 rad about a transverse axis near the ears.
    pivot_y, pivot_z = -0.05 * _RADII[1], -0.25 * _RADII[2]
    below_lips = _sigmoid((-0.40 - fy) / 0.006) * front * _sigmoid((0.85 - ax) * 20.0)
    jaw_angle = 0.25
    modes[:, 1, 0] = -jaw_angle * (mean[:, 2] - pivot_z) * below_lips
    modes[:, 2, 0] = jaw_angle * (mean[:, 1] - pivot_y) * below_lips
    # smile: mouth corners out and up, cheeks up a little.
    corners = _gauss(ax, fy, 0.30, -0.40, 0.12, 0.09) * front
    modes[:, 0, 1] = 7.0 * np.sign(fx) * corners
    modes[:, 1, 1] = 7.0 * corners + 2.5 * _gauss(ax, fy, 0.35, -0.15, 0.15, 0.15) * front
    # brow_raise: brows and forehead skin move up.
    modes[:, 1, 2] = 7.0 * _gauss(ax, fy, 0.42, 0.42, 0.35, 0.12) * front
    # blink: upper lids come down onto the lower lids.
    upper_lid = _gauss(ax, fy, 0.38, 0.26, 0.14, 0.035) * front
    modes[:, 1, 3] = -0.08 * _RADII[1] * upper_lid
    # pucker: lips narrow and push forward.
    lips = _gauss(fx, fy, 0.0, -0.41, 0.32, 0.12) * front
    modes[:, 0, 4] = -0.35 * mean[:, 0] * lips
    modes[:, 2, 4] = 9.0 * lips
    return modes


def _texture(fx, fy, ax, uz, front, theta):
    """(V, 3) RGB in [0, 1]: skin with lips, eyes, brows, nostrils and hair."""
    skin = np.array([0.86, 0.67, 0.54])
    colors = np.tile(skin, (fx.size, 1)) * (0.92 + 0.08 * uz[:, None].clip(0, 1))

    def paint(weight, rgb):
        weight = np.clip(weight, 0.0, 1.0)[:, None]
        colors[:] = colors * (1 - weight) + np.array(rgb) * weight

    lips = front * np.clip(1.0 - (((fx / 0.31) ** 2) + (((fy + 0.41) / 0.11) ** 2)), 0, 1) * 4
    paint(lips, (0.72, 0.33, 0.33))
    eye_white = front * _sigmoid((1.0 - ((ax - 0.38) / 0.12) ** 2 - ((fy - 0.22) / 0.045) ** 2) * 12)
    paint(eye_white, (0.95, 0.95, 0.93))
    iris = front * _sigmoid((1.0 - ((ax - 0.38) / 0.04) ** 2 - ((fy - 0.22) / 0.04) ** 2) * 12)
    paint(iris, (0.20, 0.32, 0.45))
    brows = front * _gauss(ax, fy - 0.04 * np.sin(np.clip((ax - 0.15) / 0.55, 0, 1) * math.pi), 0.42, 0.40, 0.28, 0.025)
    paint(brows * 1.5, (0.25, 0.17, 0.12))
    nostrils = front * _gauss(ax, fy, 0.07, -0.135, 0.03, 0.015)
    paint(nostrils, (0.35, 0.2, 0.18))
    top = _sigmoid((0.30 * math.pi - theta) * 12.0)
    back = _sigmoid(-uz * 8.0) * _sigmoid((0.70 * math.pi - theta) * 8.0)
    paint(np.maximum(top, back), (0.22, 0.15, 0.10))
    return np.clip(colors, 0.0, 1.0)
