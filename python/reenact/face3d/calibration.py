"""Per model and detector calibration of the landmark fit on real faces.

A detector's 68 points are not the model's 68 vertices: mediapipe's brow points sit on the upper
edge of the brow, the SFM's in its middle, and so on. Left to the fit, such systematic offsets are
absorbed by the identity (one identity shared by 150 frames bends the mesh into spikes to follow
them). A :class:`Calibration` holds, for one (model, detector) pair, what is measured on real
clips instead of guessed:

- ``landmark_offsets`` (68, 3): model-space offset of each fixed landmark, added to its vertex;
- ``landmark_sigma``: the landmark noise as a fraction of the landmark box diagonal (a robust
  scale of the residuals after the offsets), which sets the data term's weight against the priors;
- ``quality_threshold``: the largest rms / inter-ocular distance of a valid frame, a robust upper
  fence of the calibration frames' values (median + 5 x 1.4826 x MAD);
- the fit options that go with them: identity prior per frame, Huber loss.

:func:`calibrate` estimates one from clips of detected landmarks (``bench/bench_real_fit.py``
runs it on the real clips of ../shared/data). Calibrations ship as small JSON files next to this
module, ``calibrations/<model name>--<detector>.json``; they hold derived numbers, not the model.
"""
import dataclasses
import json
import pathlib

import numpy as np
import torch

from .fit import fit_landmarks
from .morphable import NUM_LANDMARKS

CALIBRATION_DIR = pathlib.Path(__file__).with_name("calibrations")

#: The fit as it was before calibration: one prior per clip, squared loss, the synthetic threshold.
LEGACY_FIT = {"id_prior_per_frame": False, "huber": None, "landmark_offsets": None, "quality_threshold": 0.08}

#: LM stopping rule for real landmarks: a relative cost change of 1e-5 halves the iterations of
#: 1e-7 and moves the identity by < 1e-3 in norm (a 112-frame real clip: 16 against 30); at most
#: 12 iterations (4 before the outline slides) change no number of bench/RESULTS.md's real-fit
#: table by more than 0.2% and save another third.
REAL_FIT_TOLERANCE = 1e-5
REAL_FIT_MAX_ITERATIONS = 12

#: Options for real landmarks when no calibration exists for the pair: the robust MAP fit with a
#: landmark noise typical of real detectors, no offsets.
UNCALIBRATED_REAL_FIT = {"id_prior_per_frame": True, "huber": 2.0, "landmark_sigma": 0.012,
                         "landmark_offsets": None, "quality_threshold": 0.08, "tolerance": REAL_FIT_TOLERANCE,
                         "max_iterations": REAL_FIT_MAX_ITERATIONS}

#: Fence of the quality threshold: median + FENCE_MADS robust standard deviations.
FENCE_MADS = 5.0
_MAD_TO_SIGMA = 1.4826
# Median length of a 2D Gaussian residual with unit standard deviation per coordinate (Rayleigh).
_RAYLEIGH_MEDIAN = float(np.sqrt(2 * np.log(2)))


@dataclasses.dataclass
class Calibration:
    model: str
    detector: str
    landmark_offsets: np.ndarray  # (68, 3) model units
    landmark_sigma: float
    quality_threshold: float
    huber: float = 2.0
    id_prior: float = 1.0
    frames: int = 0
    clips: int = 0
    note: str = ""

    def fit_options(self):
        """Keyword arguments of :func:`~reenact.face3d.fit.fit_landmarks`."""
        return {"id_prior": self.id_prior, "id_prior_per_frame": True, "huber": self.huber,
                "landmark_sigma": self.landmark_sigma, "quality_threshold": self.quality_threshold,
                "tolerance": REAL_FIT_TOLERANCE, "max_iterations": REAL_FIT_MAX_ITERATIONS,
                "landmark_offsets": torch.as_tensor(self.landmark_offsets, dtype=torch.float64)}

    def to_json(self):
        data = dataclasses.asdict(self)
        data["landmark_offsets"] = np.round(np.asarray(self.landmark_offsets, dtype=np.float64), 4).tolist()
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text, source="calibration"):
        try:
            data = json.loads(text)
            offsets = np.asarray(data.pop("landmark_offsets"), dtype=np.float64)
            calibration = cls(landmark_offsets=offsets, **data)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"invalid calibration {source}: {err}") from None
        if offsets.shape != (NUM_LANDMARKS, 3) or not np.isfinite(offsets).all():
            raise ValueError(f"invalid calibration {source}: landmark_offsets must be finite (68, 3)")
        for name in ("landmark_sigma", "quality_threshold", "huber", "id_prior"):
            value = getattr(calibration, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise ValueError(f"invalid calibration {source}: {name} must be a number > 0, got {value!r}")
        return calibration


def calibration_path(model_name, detector):
    return CALIBRATION_DIR / f"{model_name}--{detector}.json"


def load_calibration(model_name, detector):
    """The shipped calibration of a (model name, detector) pair, or None when there is none."""
    path = calibration_path(model_name, detector)
    if not path.is_file():
        return None
    return Calibration.from_json(path.read_text(encoding="utf-8"), source=str(path))


def fit_options_for(model, detector):
    """Fit options for landmarks of ``detector`` ('mediapipe', 'dlib', or None for landmarks that
    come from files or synthetic renders): the calibration when one ships, the robust uncalibrated
    options for other real detectors, and the plain fit for given landmarks."""
    if detector is None or getattr(model, "synthetic", False):
        return {}
    calibration = load_calibration(model.name, detector)
    return calibration.fit_options() if calibration is not None else dict(UNCALIBRATED_REAL_FIT)


def _offset_update(fits, weights_fixed, ridge=0.05):
    """Least-squares model-space offsets (68, 3) that would cancel the fits' residuals.

    For frame f the image moves by P_f d for a model offset d, with P_f = s_f [R_0; -R_1] (2 x 3);
    each landmark solves sum_f w P_f^T P_f d = -sum_f w P_f^T r_f, with Huber-like weights (so a
    mis-detected frame counts little) and a ridge that keeps unobservable directions (depth, when
    all frames are frontal) at 0.
    """
    normal = torch.zeros(NUM_LANDMARKS, 3, 3, dtype=torch.float64)
    rhs = torch.zeros(NUM_LANDMARKS, 3, dtype=torch.float64)
    for fit in fits:
        rotation, scale = fit.rotation.double(), fit.scale.double()
        rows = scale[:, None, None] * torch.stack([rotation[:, 0], -rotation[:, 1]], 1)  # (B, 2, 3)
        residual = fit.residuals.double()  # (B, 68, 2)
        length = residual.norm(dim=-1)
        typical = length.median().clamp_min(1e-6)
        weight = (2 * typical / length.clamp_min(1e-12)).clamp_max(1.0) * weights_fixed  # (B, 68)
        weight = weight * fit.ok[:, None].double()
        normal += torch.einsum("bl,bji,bjk->lik", weight, rows, rows)
        rhs -= torch.einsum("bl,bji,blj->li", weight, rows, residual)
    scale_squared = normal.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-12) / 3
    normal = normal + ridge * scale_squared[:, None, None] * torch.eye(3, dtype=torch.float64)
    solved = torch.linalg.solve(normal, rhs[..., None]).squeeze(-1)
    return torch.where(weights_fixed[:, None] > 0, solved, 0)


def calibrate(model, clips, detector, rounds=4, huber=2.0, initial_sigma=0.012, note=""):
    """Estimate a :class:`Calibration` from clips of real landmarks.

    Args:
        model: the MorphableModel; clips: list of (T, 68, 2) landmark arrays, one identity each
            (landmarks as ``prepare`` fits them: in the crop's pixels); detector: its name.
        rounds: fit / re-estimate rounds for the offsets.
    """
    clips = [torch.as_tensor(np.asarray(c), dtype=torch.float64) for c in clips if len(c)]
    if not clips:
        raise ValueError("calibrate needs at least one clip of landmarks")
    fixed = (model.landmarks68 >= 0).double().cpu()
    offsets = torch.zeros(NUM_LANDMARKS, 3, dtype=torch.float64)
    sigma = initial_sigma
    options = {"id_prior_per_frame": True, "huber": huber, "quality_threshold": float("inf")}
    for _ in range(rounds):
        fits = [fit_landmarks(model, c, landmark_sigma=sigma, landmark_offsets=offsets, **options) for c in clips]
        offsets = offsets + _offset_update(fits, fixed)
        offsets = offsets - offsets[fixed > 0].mean(0)  # a common shift is the pose's translation
        sigma = _residual_sigma(fits, clips, model)
    fits = [fit_landmarks(model, c, landmark_sigma=sigma, landmark_offsets=offsets, **options) for c in clips]
    rms = torch.cat([f.rms_iod.double() for f in fits])
    rms = rms[torch.isfinite(rms)]
    median = rms.median()
    threshold = float(median + FENCE_MADS * _MAD_TO_SIGMA * (rms - median).abs().median())
    return Calibration(model=model.name, detector=detector, landmark_offsets=offsets.numpy(),
                       landmark_sigma=float(sigma), quality_threshold=threshold, huber=huber,
                       frames=int(rms.numel()), clips=len(clips), note=note)


def _residual_sigma(fits, clips, model):
    """Robust per-coordinate landmark noise, as a fraction of the landmark box diagonal."""
    defined = torch.isin(torch.arange(NUM_LANDMARKS), torch.nonzero(model.landmarks68.cpu() >= 0).flatten())
    ratios = []
    for fit, landmarks in zip(fits, clips):
        diagonal = (landmarks.amax(1) - landmarks.amin(1)).norm(dim=-1)
        ratios.append((fit.residuals.double()[:, defined].norm(dim=-1) / diagonal[:, None]).flatten())
    return float(torch.cat(ratios).median() / _RAYLEIGH_MEDIAN)
