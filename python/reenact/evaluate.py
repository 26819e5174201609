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

Every metric is reported for the model and, on the same pairs, for two baselines: "geometric
warp" (the training-free warp of the source along the identity-matched mesh, :mod:`reenact.warp`)
and "copy source" (the source frame unchanged). A model that does not beat "copy source" has not
learnt to reenact.

Outputs under ``--out``: ``eval.md`` (a markdown table, one column per method) and ``eval.json``
(every number; the model's under ``metrics``, the baselines' under ``baselines``; per clip).
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

from . import output_folders

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
        pose_driving, landmarks_driving, ...). Pairs whose clip failed to decode (the loader
        substitutes another clip and flags them ``pad``) are dropped.
    """
    from .train import prepare_batch

    resolution = generator.config.resolution
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            for batch in _fixed_pair_loader(dataset, list(specs), batch_size):
                source, driving, pncc_source, pncc_driving, geometric = prepare_batch(
                    batch, face_model, resolution, device, geometric=generator.config.geometric_input)
                output = generator(source, pncc_source, pncc_driving, geometric)["output"]
                params = {k: v.numpy() for k, v in batch.items() if k not in ("source", "driving")}
                keep = ~params["pad"]  # a clip that broke while decoding was replaced: not its pair
                if not keep.all():
                    mask = torch.from_numpy(keep).to(output.device)
                    params = {k: v[keep] for k, v in params.items()}
                    source, driving, output = source[mask], driving[mask], output[mask]
                if keep.any():
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


#: The methods every evaluation scores on the same pairs: the model and its two trivial baselines.
MODEL = "model"
GEOMETRIC = "geometric warp"
COPY_SOURCE = "copy source"
METHODS = (MODEL, GEOMETRIC, COPY_SOURCE)


def geometric_baseline(face_model, batch, dataset_size):
    """The training-free geometric warp (:func:`reenact.warp.geometric_reenact`) of a
    :func:`generate` batch's source by its driving parameters, at the batch's resolution, in
    [-1, 1], the mouth interior darkened as ``reenact reenact`` does."""
    from .data.pncc import batch_geometric

    return batch_geometric(face_model, batch, batch["source"], dataset_size)[:, :3]


def method_outputs(face_model, batch, dataset_size):
    """{method: (B, 3, R, R) in [-1, 1]} for one :func:`generate` batch: the model's output, the
    geometric warp and the source frame itself."""
    return {MODEL: batch["output"], GEOMETRIC: geometric_baseline(face_model, batch, dataset_size),
            COPY_SOURCE: batch["source"]}


# -- pose and expression error through our own reconstruction ----------------------------------------

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


#: Points of mediapipe's face mesh (468 plus 10 iris points), what the dense re-fit reads.
DENSE_POINTS = 478


def _refit(face_model, landmarks, clips, dense=None):
    """Fit the found frames (one identity per clip) -> (rotation (N, 3, 3), beta (N, Ke)) float64.
    A model fitted to mediapipe's dense mesh (``face_model.dense``, the built-in ``mediapipe``
    model) re-fits ``dense`` (N, 478, 3) as ``reenact prepare`` does; others fit the 68 landmarks."""
    if getattr(face_model, "dense", False):
        fit = face_model.to("cpu").fit_dense(dense, clip_index=clips)
    else:
        from .face3d.fit import fit_landmarks

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


# -- the command -----------------------------------------------------------------------------------

class EvalError(Exception):
    """A user-facing evaluation failure (bad checkpoint, dataset or option)."""


@dataclasses.dataclass
class EvalOptions:
    """The options of ``reenact eval`` (see :func:`add_eval_parser`)."""

    checkpoint: str
    data: str
    out: str = None
    max_clips: int = 0
    batch_size: int = 8
    device: str = None
    source_frame: int = 0
    detector: str = "mediapipe"
    face_model: str = None  # None: the checkpoint's training face model, else the dataset's
    id_model: str = None
    inception: str = None
    overwrite: bool = False
    progress: bool = True

    def validate(self):
        for name, minimum in (("max_clips", 0), ("batch_size", 1), ("source_frame", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise EvalError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
        if self.detector not in ("mediapipe", "dlib", "none"):
            raise EvalError(f"--detector must be 'mediapipe', 'dlib' or 'none', got {self.detector!r}")
        checkpoint = pathlib.Path(self.checkpoint)
        if not checkpoint.is_file():
            raise EvalError(f"--checkpoint: no such file: {checkpoint}")
        if not pathlib.Path(self.data).is_dir():
            raise EvalError(f"--data is not a directory: {self.data}")
        for flag, value in (("--id-model", self.id_model), ("--inception", self.inception)):
            if value is not None and not pathlib.Path(value).is_file():
                raise EvalError(f"{flag}: no such file: {value}")

    def out_dir(self):
        if self.out is not None:
            return pathlib.Path(self.out)
        checkpoint = pathlib.Path(self.checkpoint)
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
        return run_dir / f"eval-{checkpoint.stem}"


def _first_line(text):
    return str(text).strip().splitlines()[0] if str(text).strip() else repr(text)


def _device(name):
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise EvalError(f"--device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: CUDA is not available on this machine")
    return device


def _open(options, device):
    """(generator, step, face model, dataset, feature networks) or EvalError."""
    from .data.dataset import ClipDataset, check_parameter_sizes
    from .data.format import DatasetError
    from .data.video import MediaError
    from .face3d.morphable import load_model
    from .train import TrainingError, load_generator, read_checkpoint_meta

    try:
        meta = read_checkpoint_meta(options.checkpoint)
        step = int(meta["step"])
        generator, _ = load_generator(options.checkpoint, device=device)
    except TrainingError as err:
        raise EvalError(f"--checkpoint: {_first_line(err)}") from None
    name = options.face_model
    if name is None:
        from .data.format import dataset_face_model

        trained = meta.get("options", {}).get("face_model") if isinstance(meta.get("options"), dict) else None
        name = trained if isinstance(trained, str) else (dataset_face_model(options.data) or "toy")
    try:
        face_model = load_model(name)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise EvalError(f"--face-model: {_first_line(err)}") from None
    try:
        dataset = ClipDataset(options.data, max_skip_fraction=1.0)
    except (DatasetError, MediaError) as err:
        raise EvalError(f"--data {options.data}: {_first_line(err)}") from None
    names = {str(clip.params["model_name"]) for clip in dataset.clips}
    if names != {face_model.name}:
        raise EvalError(f"the dataset was fitted with face model {sorted(names)}, but --face-model gives "
                        f"{face_model.name!r}")
    try:
        check_parameter_sizes(dataset.clips, face_model)
    except DatasetError as err:
        raise EvalError(f"--data {options.data}: {err}") from None
    networks = {}
    for kind, flag, path in (("identity", "--id-model", options.id_model), ("inception", "--inception", options.inception)):
        if path is not None:
            from .eval_networks import load_feature_network

            try:
                networks[kind] = load_feature_network(kind, path).to(device)
            except (FileNotFoundError, ValueError, ImportError) as err:
                text = str(err)
                if text.startswith("could not read"):  # torch's weights-only refusal, many lines
                    text = (f"{path} is neither .safetensors nor a weights-only torch.save state dict; eval never "
                            f"unpickles other objects (convert the weights to .safetensors)")
                raise EvalError(f"{flag}: {_first_line(text)}") from None
    return generator, step, face_model, dataset, networks


def _detector(name, face_model=None):
    """(detector or None, reason when None)."""
    if name == "none":
        return None, "not computed (--detector none)"
    if getattr(face_model, "dense", False) and name != "mediapipe":
        return None, f"not computed (the {face_model.name!r} model re-fits mediapipe's dense mesh; --detector {name} has none)"
    from .face3d.detectors import make_detector

    try:
        return make_detector(name), None
    except (ImportError, FileNotFoundError, ValueError) as err:
        return None, f"not computed ({name} detector unavailable: {err})"


def _summary(values):
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "count": int(values.size)}


def _metrics_of(face_model, options, records, store, statistics, driving_statistics, networks, detected,
                pose_reason):
    """The metrics dict of one method from its per-pair values (``store``) and the shared records."""
    metrics = {name: _summary(store[name]) for name in ("l1", "psnr", "ssim")}
    if detected:
        outputs = {key: store[key] for key in ("landmarks_output", "dense_output") if key in store}
        metrics["pose"] = dict(pose_expression_errors(face_model.to("cpu"), dict(records, **outputs)),
                               detector=options.detector)
    else:
        metrics["pose"] = {"status": pose_reason}
    if "identity" in networks:
        metrics["id_similarity"] = dict(_summary(store["id_output"]), driving_frame=float(records["id_driving"].mean()))
    else:
        metrics["id_similarity"] = {"status": NOT_COMPUTED_NO_WEIGHTS}
    if "inception" in networks:
        if statistics.count < 2:
            metrics["fid"] = {"status": "not computed (FID needs at least 2 pairs)"}
        else:
            metrics["fid"] = {"value": frechet_distance(*statistics.mean_and_covariance(),
                                                        *driving_statistics.mean_and_covariance()),
                              "samples": statistics.count}
    else:
        metrics["fid"] = {"status": NOT_COMPUTED_NO_WEIGHTS}
    return metrics


def evaluate(options):
    """Run the evaluation -> the results dict (also written to eval.json and eval.md under --out)."""
    options.validate()
    try:  # before the evaluation, so that a refused --out costs nothing
        output_folders.check_claim(options.out_dir(), "eval", overwrite=options.overwrite, escape="--overwrite")
    except output_folders.OutputFolderError as err:
        raise EvalError(str(err)) from None
    device = _device(options.device)
    started = time.perf_counter()
    generator, step, face_model, dataset, networks = _open(options, device)
    face_model = face_model.to(device)
    clips = dataset.clips if options.max_clips == 0 else dataset.clips[:options.max_clips]
    specs, skipped = self_reenactment_pairs([clip.frames for clip in clips], options.source_frame)
    skipped = [(clips[number].record.clip, reason) for number, reason in skipped]
    skipped += list(dataset.skipped)
    if not specs:
        raise EvalError(f"no pairs to evaluate in {options.data}: " + "; ".join(f"{c}: {r}" for c, r in skipped))
    detector, pose_reason = _detector(options.detector, face_model)
    from .data.progress import progress_bar

    bar = progress_bar(len(specs), "eval", "frame", options.progress)
    collected = {key: [] for key in ("clip", "frame_driving", "beta_driving", "pose_driving", "landmarks_driving",
                                     "landmarks_frame", "dense_frame", "id_driving")}
    dense = getattr(face_model, "dense", False)  # the re-fit reads the detected mesh
    per_method = {name: {"l1": [], "psnr": [], "ssim": [], "landmarks_output": [], "dense_output": [], "id_output": []}
                  for name in METHODS}
    statistics = {name: GaussianStatistics() for name in METHODS + ("driving",)}
    try:
        for batch in generate(generator, face_model, dataset, specs, options.batch_size, device):
            with torch.no_grad():
                outputs = method_outputs(face_model, batch, dataset.size)
            for key in ("clip", "frame_driving", "beta_driving", "pose_driving", "landmarks_driving"):
                collected[key].append(batch[key])
            if detector is not None:
                landmarks, _, meshes = detect_landmarks(detector, batch["driving"], dataset.size)
                collected["landmarks_frame"].append(landmarks)
                if dense:
                    collected["dense_frame"].append(meshes)
            with torch.no_grad():
                source_id = networks["identity"](batch["source"]) if "identity" in networks else None
                if source_id is not None:
                    collected["id_driving"].append(
                        cosine_similarity(networks["identity"](batch["driving"]), source_id).cpu().numpy())
                if "inception" in networks:
                    statistics["driving"].add(networks["inception"](batch["driving"]))
                for name, output in outputs.items():
                    store = per_method[name]
                    # Every method is scored against the driving frame: the ground truth.
                    for metric, values in image_metrics(output, batch["driving"]).items():
                        store[metric].append(values.numpy())
                    if detector is not None:
                        landmarks, _, meshes = detect_landmarks(detector, output, dataset.size)
                        store["landmarks_output"].append(landmarks)
                        if dense:
                            store["dense_output"].append(meshes)
                    if source_id is not None:
                        store["id_output"].append(
                            cosine_similarity(networks["identity"](output), source_id).cpu().numpy())
                    if "inception" in networks:
                        statistics[name].add(networks["inception"](output))
            bar.update(len(batch["clip"]))
    finally:
        bar.close()
        if detector is not None:
            detector.close()
    records = {key: np.concatenate(values) for key, values in collected.items() if values}
    method_metrics = {}
    for name in METHODS:
        store = {key: np.concatenate(values) for key, values in per_method[name].items() if values}
        method_metrics[name] = _metrics_of(face_model, options, records, store, statistics[name],
                                           statistics["driving"], networks, detector is not None, pose_reason)
    metrics = method_metrics[MODEL]
    scores = {name: np.concatenate(per_method[MODEL][name]) for name in ("l1", "psnr", "ssim")}
    per_clip = []
    for number in np.unique(records["clip"]):
        rows = records["clip"] == number
        per_clip.append(dict({"clip": clips[int(number)].record.clip, "pairs": int(rows.sum())},
                             **{name: float(values[rows].mean()) for name, values in scores.items()}))
    results = {
        "checkpoint": str(options.checkpoint), "step": step, "data": str(options.data),
        "resolution": generator.config.resolution, "dataset_size": dataset.size,
        "synthetic": all(clip.record.synthetic for clip in clips), "face_model": face_model.name,
        "protocol": f"self-reenactment: source frame {options.source_frame} of each clip, driven by every "
                    f"other frame of the same clip",
        "clips": len(per_clip), "pairs": int(scores["l1"].size),
        "skipped_clips": [{"clip": c, "reason": r} for c, r in skipped],
        "metrics": metrics, "baselines": {name: method_metrics[name] for name in METHODS if name != MODEL},
        "per_clip": per_clip, "seconds": time.perf_counter() - started,
    }
    write_report(results, options.out_dir(), inputs=[pathlib.Path(options.checkpoint)])
    return results


def _number(value, digits):
    return f"{value:.{digits}f}"


def markdown_table(results):
    """The eval.md text of a results dict: one column per method, all on the same pairs."""
    methods = {MODEL: results["metrics"], **results.get("baselines", {})}
    names = [name for name in METHODS if name in methods]
    header = " | ".join(names)

    def row(label, cell, notes=""):
        return f"| {label} | " + " | ".join(cell(methods[name]) for name in names) + f" | {notes} |"

    lines = [f"# reenact eval: {results['checkpoint']} (step {results['step']})", "",
             f"- data: `{results['data']}`{' [synthetic]' if results['synthetic'] else ''}; "
             f"{results['clips']} clips, {results['pairs']} pairs; {results['protocol']}",
             f"- compared at {results['resolution']}x{results['resolution']} over the whole face crop "
             f"(dataset crops: {results['dataset_size']} px); face model: {results['face_model']}",
             f"- every method on the same pairs, against the driving frame: the model; \"{GEOMETRIC}\", the "
             f"training-free warp of the source along the identity-matched mesh (reenact.warp); \"{COPY_SOURCE}\", "
             f"the source frame unchanged", "",
             f"| metric | {header} | notes |", "|---|" + "---|" * len(names) + "---|",
             row("L1 (lower is better)", lambda m: _number(m["l1"]["mean"], 4), "mean abs. difference, images in [0, 1]"),
             row("PSNR dB (higher is better)", lambda m: _number(m["psnr"]["mean"], 2),
                 f"per image, capped at {PSNR_CAP_DB:.0f} dB"),
             row("SSIM (higher is better)", lambda m: _number(m["ssim"]["mean"], 4), "Gaussian window 11, sigma 1.5")]
    pose = results["metrics"]["pose"]
    if "status" in pose:
        lines.append(f"| pose / expression error | " + " | ".join([pose["status"]] + ["-"] * (len(names) - 1)) + " | |")
    else:
        lines.append(row("landmark detection rate on the output", lambda m: f"{m['pose']['detection_rate_output']:.0%}",
                         f"{pose['detector']}, on images upsampled to {DETECT_SIZE} px; driving frames: "
                         f"{pose['detection_rate_driving_frame']:.0%}"))
        labels = (("rotation_deg", "rotation error (deg)", 2), ("expression_abs", "expression error (mean abs. coeff.)", 4),
                  ("landmarks_iod", "landmark error / inter-ocular distance", 4))
        for key, label, digits in labels:
            def cell(m, key=key, digits=digits):
                return _number(m["pose"]["output_vs_params"][key], digits) if "output_vs_params" in m["pose"] \
                    else "n/a (no detections)"
            floor = pose.get("driving_frame_vs_params")
            lines.append(row(f"{label}: output re-fit vs driving params", cell,
                             "floor (driving frame's own re-fit vs params): "
                             + (_number(floor[key], digits) if floor else "n/a (no detections)")))
    ident = results["metrics"]["id_similarity"]
    if "status" in ident:
        lines.append(f"| identity cosine similarity to the source | " + " | ".join([ident["status"]] + ["-"] * (len(names) - 1)) + " | |")
    else:
        lines.append(row("identity cosine similarity to the source", lambda m: _number(m["id_similarity"]["mean"], 4),
                         f"driving frame vs source: {_number(ident['driving_frame'], 4)}"))
    fid = results["metrics"]["fid"]
    if "status" in fid:
        lines.append("| FID (output vs driving frames) | " + " | ".join([fid["status"]] + ["-"] * (len(names) - 1)) + " | |")
    else:
        lines.append(row("FID (output vs driving frames)", lambda m: _number(m["fid"]["value"], 3) if "value" in m["fid"]
                         else m["fid"]["status"], f"{fid['samples']} samples; torchvision Inception-v3 layout"))
    if results["skipped_clips"]:
        lines += ["", "Skipped clips:"] + [f"- {s['clip']}: {s['reason']}" for s in results["skipped_clips"]]
    return "\n".join(lines) + "\n"


def write_report(results, out_dir, inputs=()):
    """Write eval.json and eval.md under ``out_dir`` (created); never over one of ``inputs``."""
    from .cli import _output_path

    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalError(f"--out must be a directory: {out_dir}")
    try:
        output_folders.claim(out_dir, "eval", "a rerun replaces eval.json and eval.md here", overwrite=True)
        _output_path(out_dir, "eval.json", list(inputs)).write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
        _output_path(out_dir, "eval.md", list(inputs)).write_text(markdown_table(results))
    except output_folders.OutputFolderError as err:
        raise EvalError(str(err)) from None
    except OSError as err:
        raise EvalError(f"--out {out_dir}: cannot write the report ({err.strerror or err})") from None


def run_eval(args):
    from .cli import CommandError, UsageError

    names = [field.name for field in dataclasses.fields(EvalOptions) if field.name != "progress"]
    options = EvalOptions(**{name: getattr(args, name) for name in names}, progress=not args.quiet)
    try:
        options.validate()
    except EvalError as err:
        raise UsageError(str(err)) from None
    try:
        results = evaluate(options)
    except EvalError as err:
        raise CommandError(str(err)) from None
    methods = {MODEL: results["metrics"], **results["baselines"]}
    summary = "; ".join(f"{name}: L1 {m['l1']['mean']:.4f}, PSNR {m['psnr']['mean']:.2f} dB, SSIM {m['ssim']['mean']:.4f}"
                        for name, m in methods.items())
    print(f"{results['pairs']} pairs of {results['clips']} clips: {summary}; wrote {options.out_dir()}")
    return 0


def add_eval_parser(subparsers):
    parser = subparsers.add_parser(
        "eval", help="self-reenactment metrics of a checkpoint (SSIM, PSNR, L1, pose/expression error)",
        description="For each clip, reenact its source frame with every other frame of the clip and compare "
                    "with the real frame. Writes eval.md and eval.json. Identity similarity and FID need "
                    "user-supplied weights (.safetensors or weights-only torch files; no code is loaded).")
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.safetensors)")
    parser.add_argument("--data", required=True, help="dataset directory (with manifest.jsonl), e.g. held-out clips")
    parser.add_argument("--out", help="output directory (default: eval-<checkpoint name> in the run directory)")
    parser.add_argument("--max-clips", type=int, default=0, help="evaluate only the first N clips (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per generator batch (default 8)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--source-frame", type=int, default=0, help="the source frame of each clip (default 0)")
    parser.add_argument("--detector", default="mediapipe", choices=["mediapipe", "dlib", "none"],
                        help="landmark detector of the pose/expression re-fit (default mediapipe)")
    parser.add_argument("--face-model", default=None,
                        help="the face model the dataset was fitted with (default: the checkpoint's training "
                             "model, else the one the dataset's parameter files name)")
    parser.add_argument("--id-model", help="ArcFace IResNet weights (.safetensors or weights-only torch file)")
    parser.add_argument("--inception", help="torchvision Inception-v3 weights (.safetensors or weights-only torch file)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out that `reenact eval` did not create")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_eval)
