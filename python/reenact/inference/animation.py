"""``reenact reenact``: animate a source image with the pose and expression of a driving video.

    reenact reenact [--checkpoint run/checkpoints/ckpt-00002000.safetensors] \\
        --source face.png --driving talk.mp4 --out out.mp4 [--pose relative|absolute] [--side-by-side]

Without ``--checkpoint`` it runs the training-free geometric mode (:mod:`reenact.warp`) with the
built-in mediapipe face model, and pastes back exactly as the learned mode does.

Pipeline (DESIGN.md, steps 1-5, per driving frame):

1. detect 68 landmarks in the source image and in every driving frame (mediapipe or dlib, or
   ``--source-landmarks`` / ``--driving-landmarks`` files) and fit the face model: one identity for
   the source, one shared identity for the driving clip. A driving frame without a face holds the
   last good frame's parameters (the first good one's before it); the count is reported.
2. crop the source face to the model's resolution: a square box of ``--crop-scale`` times the
   landmark box, the framing ``reenact prepare`` uses for its clips;
3. reconstruct ``P_s`` (the source's own PNCC) and ``P_d'`` (source identity, driving expression,
   driving pose): ``relative`` applies the driving head motion since the first driving frame to the
   source pose; ``absolute`` uses the driving pose as seen in a crop of the driving face;
4. encode the source once (``Reenactor.encode_source``), then generate in batches of ``--batch-size``
   (``Reenactor.drive``);
5. paste each generated crop back into the source image under a feathered mask (the union of the
   source and driving face masks, dilated and blurred, fading out at the crop's border), so the
   video has the source image's size; encode it with PyAV (H.264 .mp4, or VP9 .webm).

``--side-by-side`` writes source | driving | P_d' | result panels, all at the source's height.

:func:`animate` is the library entry point behind the command: it takes known parameters, so the
demo and other callers need no detector.
"""
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ..data.framing import crop_boxes, crop_frame
from ..data.prepare import PrepareOptions
from ..face3d.detectors import check_image
from ..face3d.pncc import reconstruct_pncc
from ..face3d.synthetic import project_landmarks
from ..validation import is_int
from ..warp import geometric_reenact, shade_mouth

#: The crop framing of ``reenact prepare``: a square of this many landmark-box sides.
DEFAULT_CROP_SCALE = PrepareOptions.crop_scale
POSE_MODES = ("relative", "absolute")
#: Crop side of the geometric mode (no checkpoint): the warp costs milliseconds at this size.
GEOMETRIC_RESOLUTION = 256
#: The face model of the geometric mode when --face-model is not given: the built-in real one.
GEOMETRIC_FACE_MODEL = "mediapipe"
OUTPUT_CODECS = {".mp4": "h264", ".webm": "vp9"}


@dataclasses.dataclass
class ReenactedFrame:
    """One animated frame: ``image`` the result in the source image's frame (H, W, 3) uint8;
    ``pncc`` P_d' pasted into that frame (H, W, 3) uint8, black outside the face; ``face`` the
    generator's crop (R, R, 3) uint8; ``box`` the source crop box (x0, y0, x1, y1)."""

    image: np.ndarray
    pncc: np.ndarray
    face: np.ndarray
    box: np.ndarray


# -- geometry ------------------------------------------------------------------------------------

def pose_to_crop(pose, box, size):
    """Map image-space poses (B, 3, 4) into the pixels of a ``size`` x ``size`` crop of the square
    ``box`` (x0, y0, x1, y1) -> (B, 3, 4). The same mapping as ``prepare.to_crop`` for points; z is
    scaled with x and y so the pose stays a scaled rotation."""
    pose = torch.as_tensor(pose, dtype=torch.float32)
    box = torch.as_tensor(np.asarray(box, dtype=np.float64)).to(pose)
    step = (box[..., 2] - box[..., 0]) / size
    origin = box[..., :2] + 0.5 * step[..., None] - 0.5
    shifted = pose.clone()
    shifted[..., :2, 3] = shifted[..., :2, 3] - origin
    return shifted / step[..., None, None]


def _landmark_box(landmarks, crop_scale):
    """One square crop box (4,) from landmarks (68, 2)."""
    return crop_boxes(np.asarray(landmarks, dtype=np.float64)[None], crop_scale, 0.0)[0]


def feathered_mask(*masks, softness=None):
    """The paste-back mask of a crop: the union of face masks (B|1, 1, R, R), dilated and blurred
    by ``softness`` pixels (default R/16), and faded to 0 over that many pixels at the crop border.
    Returns (B, 1, R, R) in [0, 1]."""
    union = torch.stack(torch.broadcast_tensors(*masks)).amax(0).float()
    size = union.shape[-1]
    radius = max(1, round(size / 16)) if softness is None else int(softness)
    kernel = 2 * radius + 1
    grown = F.max_pool2d(union, kernel, stride=1, padding=radius)
    soft = F.avg_pool2d(F.pad(grown, (radius,) * 4, mode="replicate"), kernel, stride=1)
    ramp = ((torch.arange(size, dtype=soft.dtype) + 0.5) / (radius + 1)).clamp(max=1.0)
    ramp = torch.minimum(ramp, ramp.flip(0))
    return soft * ramp[None, :] * ramp[:, None]


def paste_back(frame, crops, masks, box):
    """Blend crops (B, 3, R, R) in [0, 1] into copies of ``frame`` (H, W, 3) uint8 at the square
    ``box`` under masks (B, 1, R, R) -> (B, H, W, 3) uint8. Pixels outside the box are the frame's."""
    batch, _, size, _ = crops.shape
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    step = (x1 - x0) / size
    ox, oy = x0 + 0.5 * step - 0.5, y0 + 0.5 * step - 0.5
    c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)) + 1, width)
    r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)) + 1, height)
    out = np.repeat(frame[None], batch, axis=0)
    if c0 >= c1 or r0 >= r1:
        return out
    gx = torch.from_numpy((2 * (np.arange(c0, c1) - ox) / step + 1) / size - 1).float()
    gy = torch.from_numpy((2 * (np.arange(r0, r1) - oy) / step + 1) / size - 1).float()
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None].expand(batch, -1, -1, -1)
    crops, masks = crops.float().cpu(), masks.float().cpu()
    color = F.grid_sample(crops, grid, mode="bilinear", padding_mode="border", align_corners=False)
    alpha = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    region = torch.from_numpy(frame[r0:r1, c0:c1]).permute(2, 0, 1)[None].float() / 255.0
    blended = region * (1 - alpha) + color.clamp(0, 1) * alpha
    out[:, r0:r1, c0:c1] = (blended * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def _to_uint8(images):
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# -- animation -----------------------------------------------------------------------------------

def _params(params, key, where, ndim):
    if key not in params:
        raise ValueError(f"{where} lacks '{key}'")
    value = torch.as_tensor(np.asarray(params[key], dtype=np.float32))
    if value.ndim != ndim:
        raise ValueError(f"{where}['{key}'] must have {ndim} dimension(s), got shape {tuple(value.shape)}")
    return value


def _landmarks(face_model, alpha, beta, pose):

    return project_landmarks(face_model, alpha.to(face_model.device), beta.to(face_model.device),
                             pose.to(face_model.device)).cpu().numpy()


def animate(generator, face_model, source_image, source_params, driving_params, *, pose_mode="relative",
            batch_size=8, crop_scale=DEFAULT_CROP_SCALE, source_box=None, driving_boxes=None, progress=None):
    """Animate ``source_image`` with known parameters; yields one :class:`ReenactedFrame` per
    driving frame, in order.

    Args:
        generator: a :class:`~reenact.model.Reenactor` (its device is used; put it in eval mode),
            or None for the training-free geometric mode (:func:`reenact.warp.geometric_reenact`
            on a GEOMETRIC_RESOLUTION crop, on the CPU; the mouth interior darkened), pasted back
            the same way.
        face_model: the MorphableModel the parameters belong to.
        source_image: (H, W, 3) uint8 RGB.
        source_params: dict with ``alpha`` (Ki,), ``beta`` (Ke,), ``pose`` (3, 4) in the source
            image's pixels, and optionally ``landmarks`` (68, 2) (else projected from the params).
        driving_params: dict with ``beta`` (T, Ke) and ``pose`` (T, 3, 4) in the driving frames'
            pixels; for ``pose_mode="absolute"`` without ``driving_boxes`` also ``landmarks``
            (T, 68, 2) or the driving identity ``alpha`` (Ki,) to project them.
        pose_mode: "relative" (driving motion since its first frame, on top of the source pose) or
            "absolute" (the driving pose in a crop of the driving face, used as it is).
        crop_scale: crop side over the landmark box side (``reenact prepare``'s framing).
        source_box: the source crop (x0, y0, x1, y1), square; default from the landmarks.
        driving_boxes: (T, 4) driving crops for "absolute"; default from the driving landmarks,
            smoothed over time like ``reenact prepare``'s.
        progress: optional callable, called with the number of frames finished after each batch.
    """
    if pose_mode not in POSE_MODES:
        raise ValueError(f"pose_mode must be one of {POSE_MODES}, got {pose_mode!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    source_image = check_image(source_image, "source_image")
    if not source_image.flags.writeable:
        source_image = source_image.copy()  # torch.from_numpy warns on read-only arrays
    geometric = generator is None
    resolution = GEOMETRIC_RESOLUTION if geometric else generator.config.resolution
    device = torch.device("cpu") if geometric else next(generator.parameters()).device
    model = face_model.to(device) if face_model.device != device else face_model
    alpha = _params(source_params, "alpha", "source_params", 1)
    beta_src = _params(source_params, "beta", "source_params", 1)
    pose_src = _params(source_params, "pose", "source_params", 2)
    beta_drv = _params(driving_params, "beta", "driving_params", 2)
    pose_drv = _params(driving_params, "pose", "driving_params", 3)
    frames = beta_drv.shape[0]
    if pose_drv.shape[0] != frames:
        raise ValueError(f"driving_params has {frames} expressions but {pose_drv.shape[0]} poses")

    if source_box is None:
        landmarks = source_params.get("landmarks")
        if landmarks is None:
            landmarks = _landmarks(model, alpha[None], beta_src[None], pose_src[None])[0]
        source_box = _landmark_box(landmarks, crop_scale)
    source_box = np.asarray(source_box, dtype=np.float64)
    if pose_mode == "absolute" and driving_boxes is None:
        landmarks = driving_params.get("landmarks")
        if landmarks is None:
            if "alpha" not in driving_params:
                raise ValueError("pose_mode='absolute' needs driving_boxes, driving_params['landmarks'] "
                                 "or driving_params['alpha']")
            landmarks = _landmarks(model, _params(driving_params, "alpha", "driving_params", 1)[None],
                                   beta_drv, pose_drv)
        driving_boxes = crop_boxes(np.asarray(landmarks, dtype=np.float64), crop_scale,
                                   PrepareOptions.smooth_sigma)

    crop = torch.from_numpy(crop_frame(source_image, source_box, resolution)).permute(2, 0, 1)[None]
    crop = (crop.float().to(device) / 127.5 - 1.0)
    pose_src_crop = pose_to_crop(pose_src[None], source_box, resolution).to(device)
    alpha, beta_drv, pose_drv = alpha[None].to(device), beta_drv.to(device), pose_drv.to(device)
    beta_src = beta_src[None].to(device)
    with torch.no_grad():
        pncc_src, mask_src = reconstruct_pncc(model, alpha, beta_src, pose_src_crop, size=resolution)
        # The source stage (E_a, E_g(P_s), the corr_warp values) once for the whole clip; each
        # batch runs only the driving stage, with the batch-1 encoding expanded to it.
        encoding = None if geometric else generator.encode_source(crop, pncc_src)
        black = np.zeros_like(source_image)
        for start in range(0, frames, batch_size):
            stop = min(start + batch_size, frames)
            if pose_mode == "relative":
                driving = {"pose_drv": pose_drv[start:stop], "pose_ref": pose_drv[:1], "mode": "relative"}
            else:
                pose = pose_to_crop(pose_drv[start:stop].cpu(), driving_boxes[start:stop], resolution)
                driving = {"pose_drv": pose.to(device), "pose_ref": None, "mode": "absolute"}
            pncc, mask = reconstruct_pncc(model, alpha, beta_drv[start:stop], pose_src=pose_src_crop,
                                          size=resolution, **driving)
            count = stop - start
            warped = None
            if geometric or generator.config.geometric_input:
                warp = geometric_reenact(model, (crop + 1) / 2, alpha, beta_src, pose_src_crop,
                                         beta_drv[start:stop], **driving)
                warped = shade_mouth(warp).clamp(0, 1)
            if geometric:
                face = warped
            else:
                # ModelConfig.geometric_input: the warp and its holes, as in training (batch_geometric).
                extra = None if warped is None else torch.cat([warped * 2 - 1, warp.holes], 1)
                face = (generator.drive(encoding, pncc, extra)["output"] + 1) / 2
            images = paste_back(source_image, face, feathered_mask(mask_src, mask), source_box)
            panels = paste_back(black, pncc, mask, source_box)
            faces = _to_uint8(face)
            for k in range(count):
                yield ReenactedFrame(images[k], panels[k], faces[k], source_box)
            if progress is not None:
                progress(count)


# -- command line --------------------------------------------------------------------------------

def side_by_side(source, driving, pncc, result):
    """source | driving | P_d' | result, every panel at the source's height -> (H, W', 3) uint8.
    The driving frame keeps its aspect ratio (width rounded to even)."""
    height = source.shape[0]
    if driving.shape[0] != height:
        from PIL import Image  # optional dependency (pillow), needed only to resize a mismatched driving frame

        width = max(2, int(round(driving.shape[1] * height / driving.shape[0] / 2)) * 2)
        driving = np.asarray(Image.fromarray(driving).resize((width, height), Image.BILINEAR))
    return np.concatenate([source, driving, pncc, result], axis=1)


def fill_missing(found, values):
    """Values (N, ...) of the found frames -> (T, ...) where a frame without a face holds the last
    good frame's value (the first good one's before it)."""
    last_good = np.cumsum(found) - 1  # row of `values` of the last found frame at or before each frame
    return values[np.maximum(last_good, 0)]
