"""The real-face part of ``reenact demo``: the astronaut portrait, animated with no training.

skimage's public-domain astronaut photo is fitted with the built-in mediapipe face model and
driven, through the training-free geometric mode (:mod:`reenact.warp`), by

1. the scripted expressions and head motion of :mod:`reenact.face3d.expressions` (smile, open
   mouth, raise brows, blink, turn, nod);
2. the head pose and expression of matplotlib's Grace Hopper portrait. One photo has no
   expression of its own in this model (its identity absorbs it), so Hopper's expression is read
   as her face minus the astronaut's in the regions expressions move (mouth, eyes, brows; see
   :func:`photo_expression`), and her pose as her head rotation.

Writes ``real_face.mp4`` (source | P_d' | result per frame) and ``real_face_grid.png`` (the same
panels for one frame of each scripted step and for Hopper). Offline, a few seconds on a CPU.
"""
import dataclasses
import pathlib

import numpy as np
import torch

from ..data.video import encode_video
from ..face3d.detectors import MediapipeDetector
from ..face3d.expressions import falloff, script_parameters
from ..face3d.loading import load_model
from ..face3d.pncc import reconstruct_pncc
from ..face3d.pose import axis_angle_to_matrix, compose_pose, decompose_pose, matrix_to_axis_angle
from ..face3d.visualize import pncc_to_uint8
from ..warp import geometric_reenact, shade_mouth

#: The astronaut photo's square around her head and shoulders (rows, cols), shown at SIZE.
ASTRONAUT_CROP = (slice(16, 240), slice(108, 332))
SIZE = 256
HOPPER_FRAMES = 14
BATCH = 8
FPS = 12.5


@dataclasses.dataclass
class RealFaceDemo:
    """What the real-face demo computed: ``source`` (SIZE, SIZE, 3) uint8, per-frame ``results``
    and ``pncc`` (T, SIZE, SIZE, 3) uint8, ``holes`` (T, SIZE, SIZE) bool, ``labels`` (T,),
    the source ``fit`` and the driving ``beta`` (T, Ke) and ``pose`` (T, 3, 4)."""

    source: np.ndarray
    results: np.ndarray
    pncc: np.ndarray
    holes: np.ndarray
    labels: list
    fit: object
    beta: torch.Tensor
    pose: torch.Tensor


def astronaut():
    """The astronaut's head-and-shoulders square, SIZE x SIZE uint8 RGB."""
    import skimage.data  # optional dependencies (scikit-image, pillow), checked by the demo's stage 0
    from PIL import Image

    crop = skimage.data.astronaut()[ASTRONAUT_CROP]
    return np.array(Image.fromarray(crop).resize((SIZE, SIZE), Image.LANCZOS))


def grace_hopper():
    import matplotlib.cbook  # optional dependencies (matplotlib, pillow), checked by the demo's stage 0
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        return np.asarray(Image.open(handle).convert("RGB"))


def photo_expression(model, alpha_driver, alpha_source):
    """A single photo's expression, as far as one photo tells it: the driver's face minus the
    source's in the regions expressions move (lips, eyes, brows and around them, weight 1 there
    fading to 0 over ~10 mm), as offsets (Ke,). Everything else of the driver's face is identity."""
    mean = model.mean.numpy().astype(np.float64)
    moving = [v for name in ("lips", "right_eye", "left_eye", "right_brow", "left_brow") for v in model.regions[name]]
    weight = torch.from_numpy(falloff(mean, mean[moving], 6.0)).float()
    difference = (alpha_driver - alpha_source).reshape(-1, 3)
    # Only the shape change, not the two faces' different proportions: remove the mean offset.
    difference = difference - (weight[:, None] * difference).sum(0) / weight.sum()
    return (weight[:, None] * difference).reshape(-1)


def driving_parameters(model, fit, hopper_fit):
    """The script's frames, then a move to Hopper's pose and expression and a hold."""
    script = script_parameters(model, fit.beta[0], fit.pose[0])
    rotation, scale, translation = decompose_pose(fit.pose[:1])
    hopper_rotation = decompose_pose(hopper_fit.pose[:1])[0]
    target_beta = fit.beta[0] + photo_expression(model, hopper_fit.clip_alpha[0], fit.clip_alpha[0])
    change = matrix_to_axis_angle(hopper_rotation @ rotation.transpose(-1, -2))  # (1, 3)
    steps = torch.linspace(0, 1, HOPPER_FRAMES)[:, None]
    steps = steps * steps * (3 - 2 * steps)
    turn = axis_angle_to_matrix(steps * change)
    pose = compose_pose(turn @ rotation, scale.expand(HOPPER_FRAMES), translation.expand(HOPPER_FRAMES, -1))
    beta = fit.beta[:1] + steps * (target_beta - fit.beta[0])[None]
    labels = script["labels"] + ["Grace Hopper's pose and expression"] * HOPPER_FRAMES
    return torch.cat([script["beta"], beta]), torch.cat([script["pose"], pose]), labels


def run_real_face():
    """Fit, drive and warp -> :class:`RealFaceDemo`."""
    model = load_model("mediapipe")
    source = astronaut()
    with MediapipeDetector() as detector:
        points = detector.detect_dense(source)
        hopper_points = detector.detect_dense(grace_hopper())
    if points is None or hopper_points is None:
        raise RuntimeError("mediapipe found no face in the astronaut or Grace Hopper portrait")
    fit = model.fit_dense(points[None])
    hopper_fit = model.fit_dense(hopper_points[None])
    beta, pose, labels = driving_parameters(model, fit, hopper_fit)
    image = torch.from_numpy(source).permute(2, 0, 1)[None].float() / 255
    results, pnccs, holes = [], [], []
    with torch.no_grad():
        for start in range(0, len(beta), BATCH):
            stop = min(start + BATCH, len(beta))
            warp = geometric_reenact(model, image, fit.alpha, fit.beta, fit.pose, beta[start:stop],
                                     pose[start:stop], mode="absolute")
            results.append((shade_mouth(warp).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())
            holes.append(warp.holes[:, 0].numpy() > 0)
            pncc, _ = reconstruct_pncc(model, fit.alpha, beta[start:stop], pose[start:stop], size=SIZE)
            pnccs.append(np.stack([pncc_to_uint8(p) for p in pncc]))
    return RealFaceDemo(source, np.concatenate(results), np.concatenate(pnccs), np.concatenate(holes),
                        labels, fit, beta, pose)


def grid_frames(labels):
    """One frame per scripted step (its last, where the step is fullest) and Hopper's last."""
    picks, seen = [], set()
    for name in ("smile", "open mouth", "raise brows", "blink", "turn left", "turn right", "nod down",
                 "Grace Hopper's pose and expression"):
        indices = [i for i, label in enumerate(labels) if label == name]
        if indices and name not in seen:
            picks.append(indices[-1])
            seen.add(name)
    return picks


def write_real_face(out_dir):
    """Run the real-face demo and write OUT/real_face.mp4 and OUT/real_face_grid.png -> paths."""
    out_dir = pathlib.Path(out_dir)
    demo = run_real_face()
    frames = (np.concatenate([demo.source, p, r], 1) for p, r in zip(demo.pncc, demo.results))
    video = out_dir / "real_face.mp4"
    encode_video(video, frames, fps=FPS, codec="h264")
    picks = grid_frames(demo.labels)
    grid = grid_image(demo, picks)
    path = out_dir / "real_face_grid.png"
    grid.save(path, optimize=True)
    return {"real_video": video, "real_grid": path, "demo": demo}


#: The grid's frames are laid out in this many side-by-side blocks of source | P_d' | result.
GRID_BLOCKS = 2
CAPTION = 14


def grid_image(demo, picks):
    """Rows of source | P_d' | result (labelled) for the frames ``picks``, in GRID_BLOCKS blocks."""
    from PIL import Image, ImageDraw  # optional dependency (pillow), checked by the demo before any work

    rows_per_block = -(-len(picks) // GRID_BLOCKS)
    block_width = 3 * SIZE
    canvas = Image.new("RGB", (GRID_BLOCKS * block_width, rows_per_block * SIZE + CAPTION), "white")
    draw = ImageDraw.Draw(canvas)
    for block in range(GRID_BLOCKS):
        for k, name in enumerate(("source (astronaut, public domain)", "P_d' (built-in mediapipe model)",
                                  "result (geometric mode, no training)")):
            draw.text((block * block_width + k * SIZE + 4, 2), name, fill="black")
    for n, index in enumerate(picks):
        block, row = divmod(n, rows_per_block)
        left, top = block * block_width, CAPTION + row * SIZE
        panels = np.concatenate([demo.source, demo.pncc[index], demo.results[index]], 1)
        canvas.paste(Image.fromarray(panels), (left, top))
        draw.text((left + 2 * SIZE + 4, top + 4), demo.labels[index], fill="white")
    return canvas
