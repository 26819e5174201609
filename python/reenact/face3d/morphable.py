"""Linear 3D morphable face models: shape = mean + id_basis @ alpha + exp_basis @ beta.

Model space is x right, y up, z towards the viewer (see :mod:`reenact.face3d.pose`); image space
is reached with a batch of 3x4 poses.
"""
import pathlib

import numpy as np
import torch

from ..validation import read_npz as checked_read_npz
from .pose import apply_pose

NUM_LANDMARKS = 68
#: The name of the built-in real face model (mediapipe's face mesh) for load_model.
MEDIAPIPE_MODEL = "mediapipe"

#: Keys of the project's ``.npz`` model format (those of ../shared/data/face-models/sfm_3448.npz).
NPZ_REQUIRED_KEYS = ("mean", "id_basis", "exp_basis", "faces", "ibug68")
NPZ_OPTIONAL_KEYS = ("contour_right", "contour_left", "exp_names", "colors", "name")


def as_tensor(name, value, dtype, shape_hint):
    """``value`` (tensor or array-like) as a tensor of ``dtype``; TypeError naming ``name`` if it
    is not numeric. Shapes are checked by the caller; ``shape_hint`` only words the message."""
    if torch.is_tensor(value):
        return value.to(dtype)
    try:
        array = np.asarray(value, dtype=np.float64 if dtype.is_floating_point else np.int64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a numeric array of shape {shape_hint}: {err}") from None
    return torch.from_numpy(array).to(dtype)


def read_npz(path, what):
    """All arrays of an ``.npz`` (never unpickling; headers checked against the file first, see
    :func:`reenact.validation.read_npz`), with errors that say which file and why."""
    return checked_read_npz(path, what)


class MorphableModel:
    """A linear morphable model with 68-point landmarks and a PNCC code.

    Attributes (torch tensors, all on ``self.device``):
        mean: (V, 3) float32, model units (e.g. millimetres).
        id_basis: (V, 3, Ki) float32; identity coefficients ``alpha`` are ~ N(0, 1).
        exp_basis: (V, 3, Ke) float32; expression coefficients ``beta`` (0 = neutral).
        faces: (F, 3) int64 vertex indices.
        landmarks68: (68,) int64 vertex index of each iBUG-68 point, -1 where the model defines
            none (contour points that slide, see ``contour_right``/``contour_left``).
        contour_right, contour_left: (C,) int64 candidate vertices for the face outline of the
            subject's right side (iBUG points 0-7) and left side (9-16), ordered from the temple
            down to the chin; or None when the model has fixed contour landmarks.
        ncc: (V, 3) float32 in [0, 1]: the mean shape, min-max normalised per axis.
        colors: (V, 3) float32 in [0, 1] per-vertex albedo, or None.
        name: human-readable name; synthetic models say so in it.
        exp_names: tuple of Ke expression names.
    """

    def __init__(self, mean, id_basis, exp_basis, faces, landmarks68, contour_right=None,
                 contour_left=None, name="morphable model", exp_names=None, colors=None,
                 synthetic=False):
        mean = as_tensor("mean", mean, torch.float32, "(V, 3)")
        if mean.ndim != 2 or mean.shape[1] != 3:
            raise ValueError(f"mean must have shape (V, 3), got {tuple(mean.shape)}")
        num_vertices = mean.shape[0]
        id_basis = as_tensor("id_basis", id_basis, torch.float32, "(V, 3, Ki)")
        exp_basis = as_tensor("exp_basis", exp_basis, torch.float32, "(V, 3, Ke)")
        for arg, basis in (("id_basis", id_basis), ("exp_basis", exp_basis)):
            if basis.ndim != 3 or basis.shape[:2] != (num_vertices, 3):
                raise ValueError(
                    f"{arg} must have shape ({num_vertices}, 3, K), got {tuple(basis.shape)}"
                )
        faces = as_tensor("faces", faces, torch.int64, "(F, 3)")
        if faces.ndim != 2 or faces.shape[1] != 3:
            raise ValueError(f"faces must have shape (F, 3), got {tuple(faces.shape)}")
        if faces.numel() and (faces.min() < 0 or faces.max() >= num_vertices):
            raise ValueError(f"faces must index vertices in [0, {num_vertices})")
        landmarks68 = as_tensor("landmarks68", landmarks68, torch.int64, "(68,)")
        if landmarks68.shape != (NUM_LANDMARKS,):
            raise ValueError(f"landmarks68 must have shape (68,), got {tuple(landmarks68.shape)}")
        if landmarks68.min() < -1 or landmarks68.max() >= num_vertices:
            raise ValueError(f"landmarks68 must be -1 or vertex indices in [0, {num_vertices})")
        contours = []
        for arg, contour in (("contour_right", contour_right), ("contour_left", contour_left)):
            if contour is not None:
                contour = as_tensor(arg, contour, torch.int64, "(C,)")
                if contour.ndim != 1 or contour.numel() == 0:
                    raise ValueError(f"{arg} must be a non-empty 1-D index list")
                if contour.min() < 0 or contour.max() >= num_vertices:
                    raise ValueError(f"{arg} must index vertices in [0, {num_vertices})")
            contours.append(contour)
        if (contours[0] is None) != (contours[1] is None):
            raise ValueError("contour_right and contour_left must be given together")
        undefined_contour = (landmarks68[:17] < 0).any().item()
        if undefined_contour and contours[0] is None:
            raise ValueError(
                "landmarks68 leaves contour points (0-16) undefined but the model has no "
                "contour_right/contour_left candidates"
            )
        if colors is not None:
            colors = as_tensor("colors", colors, torch.float32, "(V, 3)")
            if colors.shape != (num_vertices, 3):
                raise ValueError(f"colors must have shape ({num_vertices}, 3), got {tuple(colors.shape)}")

        self.mean = mean
        self.id_basis = id_basis
        self.exp_basis = exp_basis
        self.faces = faces
        self.landmarks68 = landmarks68
        self.contour_right, self.contour_left = contours
        self.colors = colors
        self.name = str(name)
        self.synthetic = bool(synthetic)
        if exp_names is None:
            exp_names = [f"exp{i}" for i in range(exp_basis.shape[2])]
        self.exp_names = tuple(str(n) for n in exp_names)
        if len(self.exp_names) != exp_basis.shape[2]:
            raise ValueError(f"exp_names must have {exp_basis.shape[2]} entries, got {len(self.exp_names)}")
        self.ncc = normalized_coordinate_code(mean)

    # -- sizes and devices ---------------------------------------------------------------------
    @property
    def num_vertices(self):
        return self.mean.shape[0]

    @property
    def num_id(self):
        return self.id_basis.shape[2]

    @property
    def num_exp(self):
        return self.exp_basis.shape[2]

    @property
    def device(self):
        return self.mean.device

    @property
    def has_contours(self):
        return self.contour_right is not None

    def to(self, device):
        """A copy of the model with every tensor on ``device``."""
        model = object.__new__(type(self))
        for key, value in vars(self).items():
            setattr(model, key, value.to(device) if torch.is_tensor(value) else value)
        return model

    def __repr__(self):
        return (f"MorphableModel(name={self.name!r}, vertices={self.num_vertices}, "
                f"faces={self.faces.shape[0]}, id={self.num_id}, exp={self.num_exp})")

    # -- geometry ------------------------------------------------------------------------------
    def check_coefficients(self, alpha, beta, batch=None):
        """Validate and broadcast coefficients to (B, Ki) and (B, Ke) float32 on the model's device.

        ``alpha`` may be (Ki,) or (B|1, Ki); ``beta`` may be None (neutral), (Ke,) or (B|1, Ke).
        Raises ValueError naming the argument on a wrong shape, TypeError on a non-numeric input.
        """
        alpha = self._coefficient("alpha", alpha, self.num_id)
        beta = (torch.zeros(1, self.num_exp, device=self.device) if beta is None
                else self._coefficient("beta", beta, self.num_exp))
        sizes = {t.shape[0] for t in (alpha, beta)} | ({batch} if batch is not None else set())
        sizes.discard(1)
        if len(sizes) > 1:
            raise ValueError(f"alpha and beta batch sizes differ: {alpha.shape[0]} vs {beta.shape[0]}")
        size = sizes.pop() if sizes else 1
        return alpha.expand(size, -1), beta.expand(size, -1)

    def _coefficient(self, name, value, width):
        if not torch.is_tensor(value):
            value = as_tensor(name, value, torch.float32, f"({width},) or (B, {width})")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real-valued tensor, got {value.dtype}")
        if value.ndim == 1:
            value = value[None]
        if value.ndim != 2 or value.shape[1] != width:
            raise ValueError(f"{name} must have shape ({width},) or (B, {width}), got {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} must be finite")
        return value.to(device=self.device, dtype=torch.float32)

    def vertices(self, alpha, beta=None):
        """Model-space vertices for coefficients alpha (B|1, Ki) and beta (B|1, Ke) -> (B, V, 3)."""
        alpha, beta = self.check_coefficients(alpha, beta)
        offsets = torch.einsum("vck,bk->bvc", self.id_basis, alpha)
        offsets = offsets + torch.einsum("vck,bk->bvc", self.exp_basis, beta)
        return self.mean + offsets

    def image_vertices(self, alpha, beta, pose):
        """Image-space vertices (B, V, 3) for coefficients and 3x4 poses (B|1, 3, 4) or (3, 4)."""
        pose = check_pose("pose", pose, device=self.device)
        alpha, beta = self.check_coefficients(alpha, beta, batch=pose.shape[0])
        if pose.shape[0] == 1 and alpha.shape[0] > 1:
            pose = pose.expand(alpha.shape[0], 3, 4)
        return apply_pose(self.vertices(alpha, beta), pose)


def check_pose(name, pose, device=None):
    """Validate 3x4 poses: (3, 4) or (B, 3, 4), finite -> (B, 3, 4) float32."""
    pose = as_tensor(name, pose, torch.float32, "(3, 4) or (B, 3, 4)")
    if pose.ndim == 2:
        pose = pose[None]
    if pose.ndim != 3 or pose.shape[1:] != (3, 4):
        raise ValueError(f"{name} must have shape (3, 4) or (B, 3, 4), got {tuple(pose.shape)}")
    if not torch.isfinite(pose).all():
        raise ValueError(f"{name} must be finite")
    return pose.to(device=device if device is not None else pose.device, dtype=torch.float32)


def normalized_coordinate_code(mean):
    """The NCC of a mean shape (V, 3): per-axis min-max normalisation to [0, 1]."""
    low = mean.min(dim=0).values
    span = (mean.max(dim=0).values - low).clamp_min(torch.finfo(mean.dtype).tiny)
    return (mean - low) / span


# -- the project's .npz format -----------------------------------------------------------------

def load_npz_model(path, name=None):
    """Load a model from the project's ``.npz`` format.

    Required keys: mean (V,3), id_basis (V,3,Ki), exp_basis (V,3,Ke), faces (F,3), ibug68 (68,).
    Optional: contour_right, contour_left (C,), exp_names (Ke,), colors (V,3), name ().
    Never unpickles (``allow_pickle=False``).
    """
    return model_from_arrays(read_npz(path, "face model"), name=name, source=path)


def model_from_arrays(arrays, name=None, source="arrays"):
    """Build a model from a mapping with the keys of the ``.npz`` format (see load_npz_model)."""
    missing = [key for key in NPZ_REQUIRED_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"face model {source} lacks the keys {missing}; it has {sorted(arrays)}")
    stored_name = str(arrays["name"]) if "name" in arrays else pathlib.Path(str(source)).stem
    return MorphableModel(
        mean=arrays["mean"], id_basis=arrays["id_basis"], exp_basis=arrays["exp_basis"],
        faces=np.asarray(arrays["faces"]).astype(np.int64),
        landmarks68=np.asarray(arrays["ibug68"]).astype(np.int64),
        contour_right=arrays.get("contour_right"), contour_left=arrays.get("contour_left"),
        exp_names=arrays.get("exp_names"), colors=arrays.get("colors"),
        name=name or stored_name,
        synthetic="synthetic" in stored_name,
    )


def save_npz_model(model, path):
    """Write ``model`` in the project's ``.npz`` format (readable by :func:`load_npz_model`)."""
    arrays = {
        "mean": model.mean.cpu().numpy(), "id_basis": model.id_basis.cpu().numpy(),
        "exp_basis": model.exp_basis.cpu().numpy(), "faces": model.faces.cpu().numpy().astype(np.int32),
        "ibug68": model.landmarks68.cpu().numpy().astype(np.int32),
        "exp_names": np.array(model.exp_names), "name": np.array(model.name),
    }
    if model.has_contours:
        arrays["contour_right"] = model.contour_right.cpu().numpy().astype(np.int32)
        arrays["contour_left"] = model.contour_left.cpu().numpy().astype(np.int32)
    if model.colors is not None:
        arrays["colors"] = model.colors.cpu().numpy()
    np.savez(path, **arrays)
