"""``reenact eval``: self-reenactment metrics of a trained generator, beside its trivial baselines.

- ``metrics``: L1, PSNR, SSIM, Gaussian statistics and the Frechet distance, cosine similarity;
- ``refit``: pose and expression error through our own landmark detection and fit;
- ``run``: the protocol (:func:`evaluate`; its docstring states it), pairs, generation, baselines;
- ``report``: ``eval.md`` and ``eval.json``; ``options``: :class:`EvalOptions`, :class:`EvalError`;
- ``networks``: the user-supplied identity and Inception networks;
- ``commands``: the ``reenact eval`` subcommand.
"""
from .metrics import (
    PSNR_CAP_DB,
    GaussianStatistics,
    cosine_similarity,
    frechet_distance,
    gaussian_window,
    image_metrics,
    l1,
    psnr,
    ssim,
)
from .options import EvalError, EvalOptions
from .refit import DETECT_SIZE, detect_landmarks, pose_expression_errors
from .report import COPY_SOURCE, GEOMETRIC, METHODS, MODEL, markdown_table, write_report
from ..data.pncc import crop_pose
from .run import (
    NOT_COMPUTED_NO_WEIGHTS,
    evaluate,
    generate,
    geometric_baseline,
    method_outputs,
    reenactment_scores,
    repeats_of_the_source,
    self_reenactment_pairs,
)

__all__ = [
    "COPY_SOURCE", "DETECT_SIZE", "GEOMETRIC", "METHODS", "MODEL", "NOT_COMPUTED_NO_WEIGHTS", "PSNR_CAP_DB",
    "EvalError", "EvalOptions", "GaussianStatistics", "cosine_similarity", "crop_pose", "detect_landmarks",
    "evaluate", "frechet_distance", "gaussian_window", "generate", "geometric_baseline", "image_metrics", "l1",
    "markdown_table", "method_outputs", "pose_expression_errors", "psnr", "reenactment_scores",
    "repeats_of_the_source", "self_reenactment_pairs", "ssim", "write_report",
]
