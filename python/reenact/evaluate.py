"""``reenact eval``: self-reenactment metrics of a trained generator on a prepared dataset.

Protocol (DESIGN-NOTES.md, "Evaluation"): for every clip, the source is one frame (``--source-frame``,
the first by default) and every other frame of the same clip drives it. ``P_s`` and ``P_d'`` come
from the dataset's stored parameters, exactly as in training (:func:`reenact.train.prepare_batch`):
the clip's identity with the driving frame's expression and pose. The driving frame itself is the
ground truth. Images are compared at the generator's resolution, over the whole face crop.

Metrics (images mapped from [-1, 1] to [0, 1]):

- ``l1``: mean absolute difference, in [0, 1] units (half the training loss's [-1, 1] units);
- ``psnr``: ``10 log10(1 / MSE)`` per image, in dB, capped at :data:`PSNR_CAP_DB`;
- ``ssim``: Wang et al. 2004 with an 11-tap Gaussian window (sigma 1.5), K1 0.01, K2 0.03, data
  range 1, per channel, over the positions where the window fits (no padding), averaged;
- pose and expression error: the output and the driving frame are both re-fitted by our own
  reconstruction (a landmark detector, then :func:`reenact.face3d.fit.fit_landmarks`, one identity
  per clip) and compared with the driving parameters: rotation error in degrees, mean absolute
  expression-coefficient error, and the detected landmarks' mean distance to the driving frame's
  landmarks over its inter-ocular distance. The driving frame's own re-fit is the floor that the
  detector and fitter set;
- identity cosine similarity (``--id-model``) and FID (``--inception``): only with user-supplied
  weights (:mod:`reenact.eval_networks`), otherwise reported as not computed.

Outputs under ``--out``: ``eval.md`` (a markdown table) and ``eval.json`` (every number, per clip).
"""
import dataclasses
import json
import math
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

#: PSNR of identical images is infinite; it is reported as this many dB (MSE floor 1e-10).
PSNR_CAP_DB = 100.0
#: Images are upsampled to this size before landmark detection (detectors want large faces).
DETECT_SIZE = 256
NOT_COMPUTED_NO_WEIGHTS = "not computed (no weights given)"


# -- image metrics (torch, images in [0, 1], shape (B, C, H, W)) ------------------------------------

def _check_pair(x, y):
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError("images must be torch tensors")
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"images must be two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")


def gaussian_window(size=11, sigma=1.5, dtype=torch.float64, device=None):
    """A normalised 1D Gaussian (size,): ``exp(-d^2 / (2 sigma^2))`` at d = -size//2 .. size//2."""
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    window = torch.exp(-offsets.square() / (2 * sigma * sigma))
    return window / window.sum()


def _gaussian_filter(images, window):
    """Separable 'valid' Gaussian filtering of (B, C, H, W), one channel at a time."""
    channels = images.shape[1]
    size = window.numel()
    rows = window.reshape(1, 1, size, 1).expand(channels, 1, size, 1)
    cols = window.reshape(1, 1, 1, size).expand(channels, 1, 1, size)
    return F.conv2d(F.conv2d(images, rows, groups=channels), cols, groups=channels)


def ssim(x, y, data_range=1.0, window_size=11, sigma=1.5, k1=0.01, k2=0.03):
    """Structural similarity per image -> (B,), the mean of the SSIM map over channels and positions.

    The map is computed where the Gaussian window fits inside the image (no padding), with
    population (not sample) statistics; this equals skimage's ``structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range)``.
    Computed in float64.
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"images must be at least {window_size} pixels a side for SSIM, got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    window = gaussian_window(window_size, sigma, torch.float64, x.device)
    mu_x, mu_y = _gaussian_filter(x, window), _gaussian_filter(y, window)
    var_x = _gaussian_filter(x * x, window) - mu_x.square()
    var_y = _gaussian_filter(y * y, window) - mu_y.square()
    cov = _gaussian_filter(x * y, window) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return value.flatten(1).mean(1)


def psnr(x, y, data_range=1.0):
    """Peak signal-to-noise ratio per image in dB -> (B,), capped at :data:`PSNR_CAP_DB`."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    floor = data_range ** 2 * 10.0 ** (-PSNR_CAP_DB / 10)
    return 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(floor))


def l1(x, y):
    """Mean absolute difference per image -> (B,)."""
    _check_pair(x, y)
    return (x.double() - y.double()).abs().flatten(1).mean(1)


def image_metrics(output, target):
    """{"l1", "psnr", "ssim"}: per-image (B,) float64 CPU tensors of images in [-1, 1]."""
    a, b = ((t.detach().float().clamp(-1, 1) + 1) / 2 for t in (output, target))
    return {"l1": l1(a, b).cpu(), "psnr": psnr(a, b).cpu(), "ssim": ssim(a, b).cpu()}


# -- feature statistics (FID) ----------------------------------------------------------------------

class GaussianStatistics:
    """Running mean and covariance of feature vectors, accumulated in float64."""

    def __init__(self):
        self.count, self._sum, self._outer = 0, None, None

    def add(self, features):
        features = features.detach().double().cpu().reshape(features.shape[0], -1)
        if self._sum is None:
            self._sum = torch.zeros(features.shape[1], dtype=torch.float64)
            self._outer = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
        self.count += features.shape[0]
        self._sum += features.sum(0)
        self._outer += features.T @ features

    def mean_and_covariance(self):
        """(mean (D,), unbiased covariance (D, D)); needs at least 2 vectors."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        mean = self._sum / self.count
        covariance = (self._outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, covariance


def _sqrt_psd(matrix):
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mean_a, cov_a, mean_b, cov_b):
    """Fréchet distance between N(mean_a, cov_a) and N(mean_b, cov_b):

        |mean_a - mean_b|^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a cov_b)^(1/2)).

    ``tr((A B)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of the
    symmetric ``A^(1/2) B A^(1/2)`` (which has the same spectrum as ``A B``), so no non-symmetric
    matrix square root and no complex parts are needed. float64.
    """
    mean_a, cov_a, mean_b, cov_b = (torch.as_tensor(t, dtype=torch.float64) for t in (mean_a, cov_a, mean_b, cov_b))
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp_min(0).sqrt().sum()
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def cosine_similarity(a, b):
    """Cosine similarity of matching rows of (B, D) embeddings -> (B,) float64."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)


# -- pairs and generation --------------------------------------------------------------------------

def self_reenactment_pairs(frame_counts, source_frame=0):
    """Per clip, ``source_frame`` driven by every other frame -> (list of PairSpec, skipped list).

    Clips with no frame besides ``source_frame`` are skipped: ``skipped`` lists (clip number,
    reason). Pairs carry no augmentation (no flip, no colour jitter).
    """
    from .data.pairs import PairSpec

    specs, skipped = [], []
    for clip, frames in enumerate(int(n) for n in frame_counts):
        if source_frame >= frames:
            skipped.append((clip, f"{frames} frames: the source frame {source_frame} is past its end"))
            continue
        specs += [PairSpec(clip, source_frame, driving, False, (1.0, 1.0, 1.0), 0.0, False)
                  for driving in range(frames) if driving != source_frame]
    return specs, skipped


def _fixed_pair_loader(dataset, specs, batch_size):
    """A fallback loader (PyAV decoding, no augmentation) that yields ``specs`` in order, once."""
    from .data.loaders import FallbackLoader
    from .data.pairs import NO_AUGMENTATION

    class FixedPairs(FallbackLoader):
        def schedule(self):
            return [specs[i:i + batch_size] for i in range(0, len(specs), batch_size)]

    return FixedPairs(dataset, batch_size=batch_size, config=NO_AUGMENTATION, device="cpu", num_workers=0)


def generate(generator, face_model, dataset, specs, batch_size=8, device="cpu"):
    """Run the generator (eval mode, no gradients) on fixed pairs of a dataset, batch by batch.

    Args:
        generator: a :class:`~reenact.model.Reenactor`; it runs in eval mode and its previous mode
            is restored afterwards.
        face_model: the MorphableModel the dataset's parameters belong to.
        dataset: a :class:`~reenact.data.dataset.ClipDataset` or a dataset directory.
        specs: PairSpecs (:func:`self_reenactment_pairs`, or any fixed pairs).
    Yields:
        dicts with source, driving, output (B, 3, R, R) in [-1, 1] at the generator's resolution R
        and the batch's parameters (numpy: clip, frame_source, frame_driving, beta_driving,
        pose_driving, landmarks_driving, ...).
    """
    from .train import prepare_batch

    resolution = generator.config.resolution
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            for batch in _fixed_pair_loader(dataset, list(specs), batch_size):
                source, driving, pncc_source, pncc_driving = prepare_batch(batch, face_model, resolution, device)
                output = generator(source, pncc_source, pncc_driving)["output"]
                params = {k: v.numpy() for k, v in batch.items() if k not in ("source", "driving")}
                yield dict(params, source=source, driving=driving, output=output)
    finally:
        generator.train(was_training)


def reenactment_scores(generator, face_model, dataset, specs, batch_size=8, device="cpu"):
    """:func:`image_metrics` of every pair -> dict of (N,) float64 numpy arrays (l1, psnr, ssim)."""
    scores = {"l1": [], "psnr": [], "ssim": []}
    for batch in generate(generator, face_model, dataset, specs, batch_size, device):
        for name, values in image_metrics(batch["output"], batch["driving"]).items():
            scores[name].append(values.numpy())
    return {name: np.concatenate(values) for name, values in scores.items()}


# -- pose and expression error through our own reconstruction ----------------------------------------

def detect_landmarks(detector, images, dataset_size):
    """Landmarks of (B, 3, R, R) images in [-1, 1], upsampled to :data:`DETECT_SIZE` for the detector.

    Returns (landmarks (B, 68, 2) float64 in dataset crop pixels, NaN where no face was found,
    found (B,) bool).
    """
    up = F.interpolate(images.detach().float().cpu().clamp(-1, 1), size=(DETECT_SIZE, DETECT_SIZE),
                       mode="bicubic", align_corners=False)
    pixels = ((up.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    landmarks = np.full((len(pixels), 68, 2), np.nan)
    for index, image in enumerate(pixels):
        detection = detector.detect(np.ascontiguousarray(image))
        if detection is not None:
            # Pixel centres on integers in both images: x_dataset = (x_up + 0.5) * S / U - 0.5.
            landmarks[index] = (detection.landmarks + 0.5) * dataset_size / DETECT_SIZE - 0.5
    return landmarks, np.isfinite(landmarks).all(axis=(1, 2))


def _refit(face_model, landmarks, clips):
    """Fit the found frames (one identity per clip) -> (rotation (N, 3, 3), beta (N, Ke)) float64."""
    from .face3d.fit import fit_landmarks

    fit = fit_landmarks(face_model.to("cpu"), torch.from_numpy(landmarks), clip_index=torch.from_numpy(clips))
    return fit.rotation.double(), fit.beta.double()


def pose_expression_errors(face_model, records):
    """Re-fit outputs and driving frames and compare them with the driving parameters.

    Args:
        records: dict of numpy arrays over N pairs: clip (N,), beta_driving (N, Ke), pose_driving
            (N, 3, 4), landmarks_driving (N, 68, 2) (the dataset's), landmarks_output and
            landmarks_frame (N, 68, 2) detected on the output and on the driving frame (NaN where
            not found).
    Returns:
        dict: detection rates, then per comparison ("output_vs_params", "driving_frame_vs_params",
        "output_vs_driving_frame") the frames used and the means of rotation_deg,
        expression_abs and landmarks_iod.
    """
    from .face3d.fit import inter_ocular_distance
    from .face3d.pose import decompose_pose, rotation_angle_between

    true_rotation = decompose_pose(torch.from_numpy(records["pose_driving"]).double())[0]
    true_beta = torch.from_numpy(records["beta_driving"]).double()
    true_landmarks = torch.from_numpy(records["landmarks_driving"]).double()
    iod = inter_ocular_distance(true_landmarks)
    fits, found = {}, {}
    for role in ("output", "frame"):
        landmarks = records[f"landmarks_{role}"]
        found[role] = np.isfinite(landmarks).all(axis=(1, 2))
        if found[role].any():
            fits[role] = _refit(face_model, landmarks[found[role]], records["clip"][found[role]])

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
