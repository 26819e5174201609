"""3DDFA_V2 compatibility: its BFM files, its 62-parameter vectors and its MobileNet-V1 regressor.

Nothing here downloads anything: the user supplies ``bfm_noneck_v3.pkl``,
``param_mean_std_62d_120x120.pkl`` and the checkpoint (e.g. ``mb1_120x120.pth``) from their own
copy of 3DDFA_V2.

- Pickles are read with :class:`SafeUnpickler`, which only reconstructs numpy arrays and plain
  builtins, none larger than the file; any other global (``os.system``, ``builtins.eval``, ...) is refused before it runs.
- Checkpoints are read with ``torch.load(weights_only=True)`` only.
- Coefficient convention: our model's bases are 3DDFA_V2's bases multiplied by the parameter
  standard deviations, so ``alpha = shape_params / std`` is ~N(0, 1)-scaled like every other model
  of this package (the fitter's priors assume that). :func:`decode_params` does this conversion.
"""
import os
import pathlib
import pickle

import numpy as np
import torch
from torch import nn

from ..validation import RestrictedUnpickler, load_pickle
from .morphable import MorphableModel

TDDFA_INPUT_SIZE = 120
NUM_POSE_PARAMS, NUM_SHAPE_PARAMS, NUM_EXP_PARAMS = 12, 40, 10
NUM_PARAMS = NUM_POSE_PARAMS + NUM_SHAPE_PARAMS + NUM_EXP_PARAMS


# -- safe pickle loading ---------------------------------------------------------------------------

#: The restricted unpickler (kept under its old name): numpy arrays and builtin containers only,
#: nothing larger than the file (reenact.validation).
SafeUnpickler = RestrictedUnpickler


def safe_load_pickle(path):
    """Load a pickle of numpy arrays / builtins without executing code from the file.

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for anything that
    is not such a pickle, including pickles that reference other callables or ask for more memory
    than the file's size (:func:`reenact.validation.load_pickle`).
    """
    return load_pickle(path)


def _require(mapping, keys, path):
    if not isinstance(mapping, dict):
        raise ValueError(f"{path} must hold a dict, got {type(mapping).__name__}")
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}; it has {sorted(mapping)}")


def load_param_mean_std(path):
    """3DDFA_V2's ``param_mean_std_62d_120x120.pkl`` -> (mean (62,), std (62,)) float32 numpy."""
    stats = safe_load_pickle(path)
    _require(stats, ("mean", "std"), path)
    mean = np.asarray(stats["mean"], dtype=np.float32).reshape(-1)
    std = np.asarray(stats["std"], dtype=np.float32).reshape(-1)
    if mean.shape != (NUM_PARAMS,) or std.shape != (NUM_PARAMS,):
        raise ValueError(f"{path}: mean and std must have {NUM_PARAMS} entries, got {mean.shape}, {std.shape}")
    return mean, std


def _faces_from(tri, num_vertices, path):
    tri = np.asarray(tri)
    if tri.ndim != 2 or 3 not in tri.shape:
        raise ValueError(f"{path}: tri must have shape (F, 3) or (3, F), got {tri.shape}")
    if tri.shape[0] == 3 and tri.shape[1] != 3:
        tri = tri.T
    tri = tri.astype(np.int64)
    if tri.size and tri.min() == 1 and tri.max() == num_vertices:  # MATLAB-style 1-based
        tri = tri - 1
    return np.ascontiguousarray(tri)


PARAM_STATS_NAME = "param_mean_std_62d_120x120.pkl"


def load_tddfa_bfm(bfm_path, param_mean_std_path=None, faces_path=None, shape_dim=NUM_SHAPE_PARAMS,
                   exp_dim=NUM_EXP_PARAMS, name=None):
    """Load 3DDFA_V2's ``bfm_noneck_v3.pkl`` (+ its parameter statistics) as a MorphableModel.

    Args:
        bfm_path: pickle with ``u`` (3V, 1), ``w_shp`` (3V, >=40), ``w_exp`` (3V, >=10),
            ``tri`` (F, 3) or (3, F), ``keypoints`` (204,) indices into the interleaved 3V vector.
        param_mean_std_path: ``param_mean_std_62d_120x120.pkl`` (mean and std of the 62 params);
            by default the file of that name next to ``bfm_path`` (3DDFA_V2's configs folder).
        faces_path: optional pickle of triangles (3DDFA_V2's ``configs/tri.pkl``), used instead of
            the ``tri`` stored in the BFM file.
    The returned model carries ``param_mean`` and ``param_std`` (62,) numpy arrays for
    :func:`decode_params`.
    """
    if param_mean_std_path is None:
        param_mean_std_path = pathlib.Path(os.fspath(bfm_path)).with_name(PARAM_STATS_NAME)
        if not param_mean_std_path.is_file():
            raise FileNotFoundError(
                f"3DDFA_V2's {PARAM_STATS_NAME} is needed with {bfm_path}: put it in the same folder "
                "or pass param_mean_std_path"
            )
    bfm = safe_load_pickle(bfm_path)
    _require(bfm, ("u", "w_shp", "w_exp", "keypoints") + (() if faces_path else ("tri",)), bfm_path)
    mean_params, std_params = load_param_mean_std(param_mean_std_path)
    u = np.asarray(bfm["u"], dtype=np.float32).reshape(-1)
    if u.size % 3:
        raise ValueError(f"{bfm_path}: u must have 3V entries, got {u.size}")
    num_vertices = u.size // 3
    w_shp = np.asarray(bfm["w_shp"], dtype=np.float32)
    w_exp = np.asarray(bfm["w_exp"], dtype=np.float32)
    for key, w, dim in (("w_shp", w_shp, shape_dim), ("w_exp", w_exp, exp_dim)):
        if w.ndim != 2 or w.shape[0] != 3 * num_vertices or w.shape[1] < dim:
            raise ValueError(f"{bfm_path}: {key} must have shape (3V={3 * num_vertices}, >={dim}), got {w.shape}")
    shape_std = std_params[NUM_POSE_PARAMS:NUM_POSE_PARAMS + shape_dim]
    exp_std = std_params[NUM_POSE_PARAMS + NUM_SHAPE_PARAMS:NUM_POSE_PARAMS + NUM_SHAPE_PARAMS + exp_dim]
    # Interleaved xyz rows: row 3v+c is coordinate c of vertex v.
    id_basis = (w_shp[:, :shape_dim] * shape_std).reshape(num_vertices, 3, shape_dim)
    exp_basis = (w_exp[:, :exp_dim] * exp_std).reshape(num_vertices, 3, exp_dim)
    keypoints = np.asarray(bfm["keypoints"]).reshape(-1).astype(np.int64)
    if keypoints.size != 3 * 68:
        raise ValueError(f"{bfm_path}: keypoints must have 204 entries, got {keypoints.size}")
    landmarks68 = keypoints[0::3] // 3
    tri = safe_load_pickle(faces_path) if faces_path else bfm["tri"]
    faces = _faces_from(tri, num_vertices, faces_path or bfm_path)
    model = MorphableModel(
        mean=u.reshape(num_vertices, 3), id_basis=id_basis, exp_basis=exp_basis, faces=faces,
        landmarks68=landmarks68, name=name or f"{pathlib.Path(os.fspath(bfm_path)).stem} (3DDFA_V2 BFM)",
        exp_names=[f"bfm_exp{i}" for i in range(exp_dim)],
    )
    model.param_mean, model.param_std = mean_params, std_params
    return model


# -- 62-parameter vectors --------------------------------------------------------------------------

def roi_box_from_bbox(bbox):
    """3DDFA_V2's square crop around a face box (left, top, right, bottom) -> roi (sx, sy, ex, ey)."""
    left, top, right, bottom = (float(v) for v in bbox[:4])
    old_size = (right - left + bottom - top) / 2
    center_x = right - (right - left) / 2.0
    center_y = bottom - (bottom - top) / 2.0 + old_size * 0.14
    size = int(old_size * 1.58)
    return np.array([center_x - size / 2, center_y - size / 2, center_x + size / 2, center_y + size / 2])


def roi_box_from_landmarks(points):
    """3DDFA_V2's square crop around landmarks (N, 2): the box's diagonal becomes the side."""
    points = np.asarray(points, dtype=np.float64)
    low, high = points.min(0), points.max(0)
    center = (low + high) / 2
    radius = (high - low).max() / 2
    side = np.sqrt(2.0) * 2 * radius
    return np.array([center[0] - side / 2, center[1] - side / 2, center[0] + side / 2, center[1] + side / 2])


def decode_params(params, roi_box, model=None, size=TDDFA_INPUT_SIZE, param_std=None):
    """Decode de-normalised 3DDFA_V2 parameters into our alpha, beta and image-space pose.

    Args:
        params: (62,) or (B, 62): 12 pose (row-major 3x4 ``[s*R | offset]`` in the y-up
            ``size`` x ``size`` crop), 40 shape, 10 expression, already multiplied by the std and
            shifted by the mean (as 3DDFA_V2's ``TDDFA.__call__`` returns them).
        roi_box: (4,) or (B, 4) crop (sx, sy, ex, ey) in image pixels.
        model: the model from :func:`load_tddfa_bfm`. When given, z is shifted so that the dense
            mesh's minimum z is 0, exactly as 3DDFA_V2's ``similar_transform`` does; without it the
            z offset is 0. It also supplies ``param_std`` when that is not passed.
        size: the network input size (120).
    Returns:
        alpha (B, 40), beta (B, 10) in this package's convention (``param / std``), and
        pose (B, 3, 4) float32 such that ``model.image_vertices(alpha, beta, pose)`` equals
        3DDFA_V2's ``recon_vers(..., dense_flag=True)`` output (transposed to (V, 3)).
    """
    params = torch.as_tensor(np.asarray(params, dtype=np.float64))
    if params.ndim == 1:
        params = params[None]
    if params.ndim != 2 or params.shape[1] != NUM_PARAMS:
        raise ValueError(f"params must have shape (62,) or (B, 62), got {tuple(params.shape)}")
    roi = torch.as_tensor(np.asarray(roi_box, dtype=np.float64))
    if roi.shape == (4,):
        roi = roi[None].expand(params.shape[0], 4)
    if roi.shape != (params.shape[0], 4):
        raise ValueError(f"roi_box must have shape (4,) or ({params.shape[0]}, 4), got {tuple(roi.shape)}")
    if param_std is None:
        if model is None or not hasattr(model, "param_std"):
            raise ValueError("decode_params needs param_std or a model from load_tddfa_bfm")
        param_std = model.param_std
    std = torch.as_tensor(np.asarray(param_std, dtype=np.float64))
    shape_std = std[NUM_POSE_PARAMS:NUM_POSE_PARAMS + NUM_SHAPE_PARAMS]
    exp_std = std[NUM_POSE_PARAMS + NUM_SHAPE_PARAMS:]
    alpha = params[:, NUM_POSE_PARAMS:NUM_POSE_PARAMS + NUM_SHAPE_PARAMS] / shape_std
    beta = params[:, NUM_POSE_PARAMS + NUM_SHAPE_PARAMS:] / exp_std

    crop_pose = params[:, :NUM_POSE_PARAMS].reshape(-1, 3, 4)
    scale_x = (roi[:, 2] - roi[:, 0]) / size
    scale_y = (roi[:, 3] - roi[:, 1]) / size
    scale_z = (scale_x + scale_y) / 2
    # similar_transform: x -> (x - 1) * sx_scale + sx; y -> (size - y) * sy_scale + sy;
    # z -> (z - 1) * s - min(z).
    linear = torch.stack([scale_x, -scale_y, scale_z], -1)[..., None] * crop_pose
    shift = torch.stack([roi[:, 0] - scale_x, size * scale_y + roi[:, 1], -scale_z], -1)
    pose = linear.clone()
    pose[:, :, 3] = linear[:, :, 3] + shift
    if model is not None:
        mesh = model.vertices(alpha.float().to(model.device), beta.float().to(model.device)).double().cpu()
        z = mesh @ pose[:, 2, :3, None] + pose[:, 2, 3, None, None]
        pose[:, 2, 3] -= z.squeeze(-1).amin(-1)
    return alpha.float(), beta.float(), pose.float()


# -- MobileNet-V1 regressor ------------------------------------------------------------------------

class _DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU (names as 3DDFA_V2)."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv_dw = nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False)
        self.bn_dw = nn.BatchNorm2d(in_channels)
        self.conv_sep = nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False)
        self.bn_sep = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        x = torch.relu(self.bn_dw(self.conv_dw(x)))
        return torch.relu(self.bn_sep(self.conv_sep(x)))


class MobileNetV1(nn.Module):
    """3DDFA_V2's MobileNet-V1 (``models/mobilenet_v1.py``): same layers, same state-dict keys.

    Input (B, 3, 120, 120) BGR normalised as ``(pixel - 127.5) / 128``; output (B, 62) normalised
    parameters (multiply by std, add mean).
    """

    # (name, output channels, stride) of the depthwise-separable blocks, at widen factor 1.
    _BLOCKS = (("dw2_1", 64, 1), ("dw2_2", 128, 2), ("dw3_1", 128, 1), ("dw3_2", 256, 2),
               ("dw4_1", 256, 1), ("dw4_2", 512, 2), ("dw5_1", 512, 1), ("dw5_2", 512, 1),
               ("dw5_3", 512, 1), ("dw5_4", 512, 1), ("dw5_5", 512, 1), ("dw5_6", 1024, 2),
               ("dw6", 1024, 1))

    def __init__(self, widen_factor=1.0, num_params=NUM_PARAMS):
        super().__init__()
        width = int(32 * widen_factor)
        self.conv1 = nn.Conv2d(3, width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.block_names = []
        for name, channels, stride in self._BLOCKS:
            out = int(channels * widen_factor)
            setattr(self, name, _DepthwiseSeparable(width, out, stride))
            self.block_names.append(name)
            width = out
        self.fc = nn.Linear(width, num_params)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.fc(x.mean(dim=(2, 3)))


def load_regressor(checkpoint_path, widen_factor=1.0, device="cpu"):
    """Build a :class:`MobileNetV1` and load a 3DDFA_V2 checkpoint into it (eval mode).

    Accepts ``{"state_dict": ...}`` or a bare state dict, keys optionally prefixed ``module.``
    (DataParallel). Loads with ``torch.load(weights_only=True)`` only; a file that needs more is
    refused. Raises ValueError naming the missing/unexpected keys when the layout differs.
    """
    path = pathlib.Path(os.fspath(checkpoint_path))
    if not path.is_file():
        raise FileNotFoundError(f"3DDFA_V2 checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"cannot load checkpoint {path} with weights_only=True: {err}") from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds no state dict")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    network = MobileNetV1(widen_factor=widen_factor)
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"checkpoint {path} does not match MobileNet-V1 (widen {widen_factor}): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}"
        )
    network.load_state_dict(state)
    return network.to(device).eval()


def crop_image(image, roi_box):
    """Crop (H, W, C) uint8 to the integer-rounded roi, zero-padding outside the image (3DDFA_V2)."""
    height, width = image.shape[:2]
    sx, sy, ex, ey = (int(round(v)) for v in roi_box)
    out = np.zeros((ey - sy, ex - sx) + image.shape[2:], dtype=image.dtype)
    src_x0, src_y0, src_x1, src_y1 = max(sx, 0), max(sy, 0), min(ex, width), min(ey, height)
    if src_x1 > src_x0 and src_y1 > src_y0:
        out[src_y0 - sy:src_y1 - sy, src_x0 - sx:src_x1 - sx] = image[src_y0:src_y1, src_x0:src_x1]
    return out


def _resize(image, size):
    try:
        import cv2  # optional dependency (OpenCV): only the regressor input needs it
    except ImportError:
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        resized = torch.nn.functional.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
        return resized[0].permute(1, 2, 0).numpy()
    return cv2.resize(image, dsize=(size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)


class TDDFARegressor:
    """3DDFA_V2's parameter regressor: crop, MobileNet-V1, de-normalise, decode.

    Args:
        checkpoint_path: the user's ``mb1_120x120.pth`` (or a file in the same format).
        model: the BFM from :func:`load_tddfa_bfm` (supplies param mean/std and the dense mesh).
    """

    def __init__(self, checkpoint_path, model, widen_factor=1.0, device="cpu"):
        if not hasattr(model, "param_mean"):
            raise ValueError("model must come from load_tddfa_bfm (it carries the 62-param statistics)")
        self.network = load_regressor(checkpoint_path, widen_factor, device)
        self.model = model
        self.device = torch.device(device)

    def preprocess(self, image_rgb, roi_box):
        """(H, W, 3) uint8 RGB + roi -> (3, 120, 120) float tensor as 3DDFA_V2 feeds its network."""
        crop = _resize(crop_image(image_rgb, roi_box), TDDFA_INPUT_SIZE)
        bgr = np.ascontiguousarray(crop[..., ::-1], dtype=np.float32)
        return (torch.from_numpy(bgr).permute(2, 0, 1) - 127.5) / 128.0

    @torch.no_grad()
    def __call__(self, image_rgb, boxes=None, landmarks=None):
        """Regress parameters for faces given by boxes (N, 4) or landmarks (N, K, 2).

        Returns (params (N, 62) de-normalised numpy, roi_boxes (N, 4) numpy).
        """
        if (boxes is None) == (landmarks is None):
            raise ValueError("give exactly one of boxes or landmarks")
        if boxes is not None:
            rois = [roi_box_from_bbox(b) for b in np.asarray(boxes, dtype=np.float64).reshape(-1, 4)]
        else:
            landmarks = np.asarray(landmarks, dtype=np.float64)
            if landmarks.ndim == 2:
                landmarks = landmarks[None]
            rois = [roi_box_from_landmarks(p) for p in landmarks]
        batch = torch.stack([self.preprocess(image_rgb, roi) for roi in rois]).to(self.device)
        normalised = self.network(batch).double().cpu().numpy()
        return normalised * self.model.param_std + self.model.param_mean, np.stack(rois)

    def reconstruct(self, image_rgb, boxes=None, landmarks=None):
        """Regress and decode: (alpha (N, 40), beta (N, 10), pose (N, 3, 4)) in image pixels."""
        params, rois = self(image_rgb, boxes=boxes, landmarks=landmarks)
        return decode_params(params, rois, model=self.model)
