"""Pose and expression error through our own reconstruction: detect landmarks on the outputs and on
the driving frames, re-fit them (one identity per clip) and compare with the driving parameters."""
import numpy as np
import torch
import torch.nn.functional as F

from ..face3d.fit import fit_landmarks, inter_ocular_distance
from ..face3d.pose import decompose_pose, rotation_angle_between

#: Images are upsampled to this size before landmark detection (detectors want large faces).
DETECT_SIZE = 256
#: Points of mediapipe's face mesh (468 plus 10 iris points), what the dense re-fit reads.
DENSE_POINTS = 478


def detect_landmarks(detector, images, dataset_size):
    """Landmarks of (B, 3, R, R) images in [-1, 1], upsampled to :data:`DETECT_SIZE` for the detector.

    Returns (landmarks (B, 68, 2) float64 in dataset crop pixels, NaN where no face was found,
    found (B,) bool, dense (B, 478, 3) float64: the detector's face mesh in dataset crop pixels, its
    depth scaled like x and y, NaN where not found or when the detector has no mesh).
    """
    up = F.interpolate(images.detach().float().cpu().clamp(-1, 1), size=(DETECT_SIZE, DETECT_SIZE),
                       mode="bicubic", align_corners=False)
    pixels = ((up.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    landmarks = np.full((len(pixels), 68, 2), np.nan)
    dense = np.full((len(pixels), DENSE_POINTS, 3), np.nan)
    scale = dataset_size / DETECT_SIZE
    for index, image in enumerate(pixels):
        detection = detector.detect(np.ascontiguousarray(image))
        if detection is not None:
            # Pixel centres on integers in both images: x_dataset = (x_up + 0.5) * S / U - 0.5.
            landmarks[index] = (detection.landmarks + 0.5) * scale - 0.5
            if detection.dense is not None and len(detection.dense) == DENSE_POINTS:
                dense[index, :, :2] = (detection.dense[:, :2] + 0.5) * scale - 0.5
                dense[index, :, 2] = detection.dense[:, 2] * scale
    return landmarks, np.isfinite(landmarks).all(axis=(1, 2)), dense


def _refit(face_model, landmarks, clips, dense=None):
    """Fit the found frames (one identity per clip) -> (rotation (N, 3, 3), beta (N, Ke)) float64.
    A model fitted to mediapipe's dense mesh (``face_model.dense``, the built-in ``mediapipe``
    model) re-fits ``dense`` (N, 478, 3) as ``reenact prepare`` does; others fit the 68 landmarks."""
    if getattr(face_model, "dense", False):
        fit = face_model.to("cpu").fit_dense(dense, clip_index=clips)
    else:
        fit = fit_landmarks(face_model.to("cpu"), torch.from_numpy(landmarks), clip_index=torch.from_numpy(clips))
    return fit.rotation.double(), fit.beta.double()


def pose_expression_errors(face_model, records):
    """Re-fit outputs and driving frames and compare them with the driving parameters.

    Args:
        records: dict of numpy arrays over N pairs: clip (N,), beta_driving (N, Ke), pose_driving
            (N, 3, 4), landmarks_driving (N, 68, 2) (the dataset's), landmarks_output and
            landmarks_frame (N, 68, 2) detected on the output and on the driving frame (NaN where
            not found); for a dense model (the built-in ``mediapipe``) also dense_output and
            dense_frame (N, 478, 3), the detected meshes it re-fits.
    Returns:
        dict: detection rates, then per comparison ("output_vs_params", "driving_frame_vs_params",
        "output_vs_driving_frame") the frames used and the means of rotation_deg,
        expression_abs and landmarks_iod.
    """
    true_rotation = decompose_pose(torch.from_numpy(records["pose_driving"]).double())[0]
    true_beta = torch.from_numpy(records["beta_driving"]).double()
    true_landmarks = torch.from_numpy(records["landmarks_driving"]).double()
    iod = inter_ocular_distance(true_landmarks)
    fits, found = {}, {}
    for role in ("output", "frame"):
        landmarks = records[f"landmarks_{role}"]
        found[role] = np.isfinite(landmarks).all(axis=(1, 2))
        dense = records.get(f"dense_{role}")
        if dense is not None:
            found[role] &= np.isfinite(dense).all(axis=(1, 2))
        if found[role].any():
            fits[role] = _refit(face_model, landmarks[found[role]], records["clip"][found[role]],
                                None if dense is None else dense[found[role]])

    def compare(rotation, beta, landmarks, reference_rotation, reference_beta, reference_landmarks, scale):
        return {"frames": int(rotation.shape[0]),
                "rotation_deg": float(rotation_angle_between(rotation, reference_rotation).mean()),
                "expression_abs": float((beta - reference_beta).abs().mean()),
                "landmarks_iod": float(((landmarks - reference_landmarks).norm(dim=-1).mean(-1) / scale).mean())}

    result = {"detection_rate_output": float(found["output"].mean()),
              "detection_rate_driving_frame": float(found["frame"].mean())}
    for role, name in (("output", "output_vs_params"), ("frame", "driving_frame_vs_params")):
        if role in fits:
            mask = torch.from_numpy(found[role])
            detected = torch.from_numpy(records[f"landmarks_{role}"][found[role]])
            result[name] = compare(*fits[role], detected, true_rotation[mask], true_beta[mask],
                                   true_landmarks[mask], iod[mask])
    both = found["output"] & found["frame"]
    if both.any():
        # Rows of each fit that belong to frames found in both images.
        pick = {role: torch.from_numpy(both[found[role]]) for role in ("output", "frame")}
        result["output_vs_driving_frame"] = compare(
            fits["output"][0][pick["output"]], fits["output"][1][pick["output"]],
            torch.from_numpy(records["landmarks_output"][both]),
            fits["frame"][0][pick["frame"]], fits["frame"][1][pick["frame"]],
            torch.from_numpy(records["landmarks_frame"][both]), iod[torch.from_numpy(both)])
    return result
