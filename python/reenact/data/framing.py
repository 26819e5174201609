"""Face crop geometry shared by ``reenact prepare``, training and inference: square boxes around
the landmarks, smoothed over time, the resampling of a frame into its box, and the mapping of
points into crops (pixel centres on integers on both sides)."""
import numpy as np
import torch

#: Sensible crop framings (crop side over the landmark box side): below 1 the crop cuts the face,
#: far above it the face is a few pixels of the crop. Files and options outside are refused.
CROP_SCALE_RANGE = (1.0, 8.0)


def _gaussian_smooth(values, sigma):
    """Smooth (T, C) along T with a Gaussian (edges reflected)."""
    if sigma <= 0 or len(values) < 2:
        return values
    radius = int(3 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(values, ((radius, radius), (0, 0)), mode="reflect" if len(values) > radius else "edge")
    return np.stack([np.convolve(padded[:, c], kernel, mode="valid") for c in range(values.shape[1])], 1)


def landmark_box_side(landmarks):
    """The side (T,) of each frame's landmark box: the larger extent of landmarks (T, 68, 2).
    A crop's ``scale`` is its side over this one."""
    return (landmarks.max(1) - landmarks.min(1)).max(1)


def crop_boxes(landmarks, scale, sigma):
    """Square crop boxes (T, 4) x0, y0, x1, y1 from landmarks (T, 68, 2): box centre and size,
    smoothed over time so the crop does not jitter with the landmarks."""
    low, high = landmarks.min(1), landmarks.max(1)
    centre = (low + high) / 2
    side = scale * landmark_box_side(landmarks)[:, None]
    smooth = _gaussian_smooth(np.concatenate([centre, side], 1), sigma)
    centre, half = smooth[:, :2], smooth[:, 2:] / 2
    return np.concatenate([centre - half, centre + half], 1)


def to_crop(points, boxes, size):
    """Map source-image points (T, N, 2) into the crops (pixel centres on integers, both sides)."""
    step = (boxes[:, 2] - boxes[:, 0]) / size  # source pixels per crop pixel
    origin = boxes[:, :2] + 0.5 * step[:, None] - 0.5  # source point of crop pixel (0, 0)
    return (points - origin[:, None]) / step[:, None, None]


def crop_frame(frame, box, size):
    """Resample the square ``box`` of an (H, W, 3) uint8 frame to (size, size, 3) (bilinear, edges replicated).

    OpenCV's fixed-point warp when cv2 is importable (mediapipe installs it; 50x faster than the
    float path, within 1 level of it), else the same sampling through torch's ``grid_sample``.
    """
    step = (box[2] - box[0]) / size
    try:
        import cv2  # optional dependency (mediapipe installs it): the torch path below serves without it
    except ImportError:
        return _crop_frame_torch(frame, box, size, step)
    # Crop pixel (j, i) samples source point (x0 + (j + 0.5) * step - 0.5, y0 + (i + 0.5) * step - 0.5).
    to_source = np.array([[step, 0.0, box[0] + 0.5 * step - 0.5], [0.0, step, box[1] + 0.5 * step - 0.5]])
    return cv2.warpAffine(np.ascontiguousarray(frame), to_source, (size, size),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)


def _crop_frame_torch(frame, box, size, step):
    coords = box[0] + (np.arange(size) + 0.5) * step - 0.5, box[1] + (np.arange(size) + 0.5) * step - 0.5
    height, width = frame.shape[:2]
    gx = torch.from_numpy((2 * coords[0] + 1) / width - 1).float()
    gy = torch.from_numpy((2 * coords[1] + 1) / height - 1).float()
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
    image = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    out = torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def dataset_crop_scale(clips):
    """How the dataset frames its faces: the median over valid frames of crop side over landmark box
    side (``reenact prepare``'s ``crop_scale``; about 2 for ``reenact synth``), or None without
    landmarks. Checkpoints record it so that inference crops new faces the way training saw them."""
    ratios = []
    for clip in clips:
        landmarks, size = clip.params.get("landmarks"), clip.params.get("image_size")
        if landmarks is None or size is None:
            continue
        landmarks = np.asarray(landmarks, dtype=np.float64)
        valid = np.asarray(clip.params.get("valid", np.ones(len(landmarks), bool)), dtype=bool)
        side = landmark_box_side(landmarks)[valid]
        ratios.append(float(size) / side[side > 0])
    if not ratios:
        return None
    return round(float(np.median(np.concatenate(ratios))), 4)
