"""3D face reconstruction and identity-matched PNCC reconstruction (the paper's steps 1 and 2).

Modules:
    morphable  MorphableModel, the project's .npz format, ``load_model("toy" | path)``
    toy        the built-in procedural head (synthetic, labelled so everywhere)
    pose       3x4 image-space poses [s*R | t] with the y flip folded in; axis-angle maths
    fit        batched Levenberg-Marquardt fit to 68 landmarks, one identity per clip
    detectors  mediapipe / dlib / file landmark detectors behind one interface
    tddfa      3DDFA_V2 files (safe pickle loader), 62-param decoding, its MobileNet-V1 regressor
    pncc       reconstruct_pncc (source identity + driving expression and pose), PNCC read-back
    pipeline   read images/videos, detect, fit; saved parameters
    synthetic  synthetic ground truth for tests and benchmarks
    visualize  overlays

Importing this package does not import the compiled ops; ``reconstruct_pncc`` does, on first use.
"""
from .fit import FitResult, fit_landmarks
from .loading import load_model
from .morphable import MorphableModel, load_npz_model, save_npz_model
from .pncc import locate_codes, reconstruct_pncc, reconstruct_vertices
from .pose import compose_pose, decompose_pose, relative_pose
from .toy import make_toy_head

__all__ = [
    "FitResult", "fit_landmarks", "MorphableModel", "load_model", "load_npz_model", "save_npz_model",
    "locate_codes", "reconstruct_pncc", "reconstruct_vertices", "compose_pose", "decompose_pose",
    "relative_pose", "make_toy_head",
]
