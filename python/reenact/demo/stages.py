"""``reenact demo``: the offline main job: a real face with no training, then the synthetic
training demo on the built-in toy head.

    reenact demo --out demo [--steps N | --minutes M] [--seed S] [--no-real-face]

Stages:

0. the real face (:mod:`reenact.demo.real_face`): skimage's astronaut portrait, fitted with the built-in
   mediapipe face model and animated in the training-free geometric mode by a scripted smile, open
   mouth, brow raise, blink, turn and nod and by Grace Hopper's pose and expression ->
   ``OUT/real_face.mp4`` and ``OUT/real_face_grid.png`` (source | P_d' | result), in seconds;
1. ``reenact synth``-style data: training clips of many toy-head identities, and two held-out
   clips (identities never seen in training) at the model's resolution;
2. training of the small config through :func:`reenact.training.train` (the recipe, and why, is in
   DESIGN-NOTES.md, "Demo recipe");
3. reenactment of the held-out source identity by the other held-out clip with the known
   parameters, through :func:`reenact.inference.animate` (no detector);
4. ``OUT/result.mp4`` (source | driving | P_d' | output per frame), ``OUT/grid.png`` (the same
   panels for a few driving frames) and ``OUT/loss.png`` (training losses; needs matplotlib).

Everything is synthetic and labelled so. The run is deterministic given ``--seed`` and the step
count; ``--minutes`` picks the step count from the measured speed of the first steps instead, so it
is only as repeatable as that measurement.
"""
import dataclasses
import importlib.util
import json
import pathlib
import sys
import time

import numpy as np

import torch

from .. import output_folders
from ..data import format as fmt, synth
from ..data.video import encode_video, iter_frames
from ..face3d.loading import load_model
from ..face3d.pose import decompose_pose, matrix_to_axis_angle
from ..inference import animate, side_by_side
from ..model import ReenactorConfig
from ..output_folders import OutputFolderError
from ..training import TrainOptions, load_generator, train
from .real_face import write_real_face

#: Panels are upscaled by this factor in the grid and the video (the model works at 64x64).
DISPLAY_SCALE = 2
GRID_ROWS = 6
#: Intra-op threads of the demo. One thread keeps the run deterministic across machines, and on a
#: shared 2-core machine it was 10x faster than two (0.19-0.30 s/step against 2.9-3.2 s/step while
#: two other jobs ran: two OpenMP threads on two busy cores wait on each other).
THREADS = 1


@dataclasses.dataclass
class DemoRecipe:
    """The training recipe of the demo (DESIGN-NOTES.md, "Demo recipe", says why each value)."""

    resolution: int = 64
    clips: int = 128
    frames: int = 32
    heldout_frames: int = 64
    steps: int = 1100
    batch_size: int = 8
    lr_g: float = 1e-3
    lr_d: float = 4e-4
    reconstruction: float = 1.0
    warp: float = 20.0
    adversarial: float = 0.0
    feature_matching: float = 0.0


#: Written first into a demo's output folder. A rerun replaces the folder's demo files only when it
#: finds this marker, so `--out` pointed at a folder of the user's never loses anything.
MARKER = output_folders.marker_path("", "demo").name


class DemoError(ValueError):
    """A demo that cannot run as asked (the message names the problem)."""


def claim_output(out_dir):
    """Create ``out_dir`` for the demo, or reuse an earlier demo's; refuse any other non-empty folder."""
    try:
        output_folders.claim(out_dir, "demo", "a rerun may replace data/, run/ and the results here")
    except OutputFolderError as err:
        raise DemoError(str(err)) from None


def _fresh(out_dir, folder):
    """Empty ``folder`` inside ``out_dir``, refusing a symbolic link on the way (a link planted at
    ``out_dir/data`` must not make a rerun delete, or write, outside ``out_dir``)."""
    try:
        output_folders.fresh_folder(out_dir, folder)
    except OutputFolderError as err:
        raise DemoError(str(err)) from None


def _stage(message, quiet):
    if not quiet:
        print(f"[demo] {message}", file=sys.stderr, flush=True)


def make_data(out_dir, recipe, seed):
    """Training dataset and the two held-out clips -> (train dir, held-out dir)."""
    data = out_dir / "data"
    train_dir, heldout_dir = data / "train", data / "heldout"
    for folder in (train_dir, heldout_dir):
        _fresh(out_dir, folder)  # an earlier demo's (claim_output checked the marker)
    synth.synth_dataset(train_dir, recipe.clips, frames=recipe.frames, size=recipe.resolution, seed=seed)
    # Another seed gives other identities (drawn from the seed's generator): unseen in training.
    synth.synth_dataset(heldout_dir, 2, frames=recipe.heldout_frames, size=recipe.resolution, seed=seed + 7919)
    return train_dir, heldout_dir


def _clip(root, index):
    """(frames (T, H, W, 3) uint8, params dict) of a clip of a synthetic dataset."""
    record = fmt.read_manifest(root)[index]
    frames = np.stack(list(iter_frames(root / record.clip)))
    return frames, fmt.load_params(root / record.params, frames=len(frames))


def _config_file(out_dir, recipe):
    config = ReenactorConfig.small(recipe.resolution, geometric_input=True).to_dict()
    config["loss"].update(reconstruction=recipe.reconstruction, warp=recipe.warp,
                          adversarial=recipe.adversarial, feature_matching=recipe.feature_matching)
    path = out_dir / "config.json"
    ReenactorConfig.from_dict(config).to_json(path)
    return path


def train_model(out_dir, train_dir, recipe, seed, *, minutes=None, quiet=False):
    """Train with :func:`reenact.training.train` -> (last checkpoint, steps run)."""
    run = out_dir / "run"
    _fresh(out_dir, run)  # an earlier demo's run (claim_output checked the marker): start afresh
    options = dict(data=str(train_dir), out=str(run), config=str(_config_file(out_dir, recipe)),
                   batch_size=recipe.batch_size, perceptual=False, seed=seed, loader="fallback", device="cpu",
                   lr_g=recipe.lr_g, lr_d=recipe.lr_d, progress=not quiet, keep_last=1)
    steps = recipe.steps
    if minutes is not None:
        # Time a few steps, then resume (bit-exact) to the step count that fills the budget.
        probe_steps = min(20, steps)
        started = time.perf_counter()
        train(TrainOptions(steps=probe_steps, checkpoint_every=probe_steps, **options))
        per_step = (time.perf_counter() - started) / probe_steps
        steps = max(probe_steps, int(minutes * 60 / per_step))
        _stage(f"{per_step:.3f} s/step measured: training to step {steps} for a {minutes:g}-minute budget", quiet)
        options["resume"] = True
    last = train(TrainOptions(steps=steps, checkpoint_every=steps, **options))
    return last, steps


def _panel(image):
    from PIL import Image  # optional dependency (pillow), checked by `reenact demo` before any work

    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((width * DISPLAY_SCALE, height * DISPLAY_SCALE),
                                                    Image.NEAREST))


def diverse_frames(pose, beta, count):
    """``count`` frame indices, in order, whose head rotations and expressions differ most (greedy
    farthest-point sampling from frame 0 over rotation vectors in units of 10 degrees and the
    expression coefficients): grid rows that show the motion rather than near-repeats."""
    rotation = decompose_pose(torch.as_tensor(np.asarray(pose, dtype=np.float64)))[0]
    features = np.concatenate([np.degrees(matrix_to_axis_angle(rotation).numpy()) / 10.0,
                               np.asarray(beta, dtype=np.float64)], axis=1)
    chosen = [0]
    distance = np.linalg.norm(features - features[0], axis=1)
    while len(chosen) < min(count, len(features)):
        distance[chosen] = -1.0  # never pick a frame twice, even among identical ones
        chosen.append(int(distance.argmax()))
        distance = np.minimum(distance, np.linalg.norm(features - features[chosen[-1]], axis=1))
    return sorted(chosen)


def reenact_heldout(checkpoint, heldout_dir, quiet=False):
    """Animate held-out clip 0's first frame by held-out clip 1 -> (list of (H, 4W, 3) uint8 rows
    (source | driving | P_d' | output), one per driving frame; the driving parameters)."""
    generator, _ = load_generator(checkpoint)
    model = load_model("toy")
    source_frames, source = _clip(heldout_dir, 0)
    driving_frames, driving = _clip(heldout_dir, 1)
    size = source_frames.shape[1]
    source_params = {"alpha": source["alpha"], "beta": source["beta"][0], "pose": source["pose"][0]}
    driving_params = {"beta": driving["beta"], "pose": driving["pose"]}
    # The synthetic frames are the crops the model was trained on: the whole frame is the box.
    whole = np.array([0.0, 0.0, size, size])
    _stage(f"reenacting held-out identity {source['identity']} with clip {driving['identity']} "
           f"({len(driving_frames)} frames, absolute pose)", quiet)
    frames = animate(generator, model, source_frames[0], source_params, driving_params, pose_mode="absolute",
                     source_box=whole, driving_boxes=np.tile(whole, (len(driving_frames), 1)))
    rows = [side_by_side(source_frames[0], drv, f.pncc, f.image) for f, drv in zip(frames, driving_frames)]
    return rows, driving_params


def write_grid(path, rows, picks, steps, seed):
    """Rows ``picks`` of source | driving | P_d' | output, with a caption."""
    from PIL import Image, ImageDraw  # optional dependency (pillow), checked by `reenact demo` first

    body = np.concatenate([_panel(rows[i]) for i in picks], axis=0)
    caption = 24
    canvas = Image.new("RGB", (body.shape[1], body.shape[0] + caption), "white")
    canvas.paste(Image.fromarray(body), (0, caption))
    draw = ImageDraw.Draw(canvas)
    panel = body.shape[1] // 4
    for k, name in enumerate(("source", "driving", "P_d'", "output")):
        draw.text((k * panel + 4, 2), name, fill="black")
    draw.text((4, 12), f"synthetic toy heads, {steps} CPU steps, seed {seed}", fill="gray")
    canvas.save(path, optimize=True)
    return path


def write_loss_plot(path, log_path):
    """Training losses per step (matplotlib) -> path, or None without matplotlib."""
    try:
        import matplotlib  # optional dependency: without it the demo skips the loss plot

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional dependency, as above
    except ImportError:
        return None
    entries = [json.loads(line) for line in pathlib.Path(log_path).read_text().splitlines() if line.strip()]
    steps = [e["step"] for e in entries]
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key in sorted(k for k in entries[0] if k.startswith("G/")):
        values = np.array([e[key] for e in entries])
        if not np.any(values):
            continue
        window = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        axis.plot(steps[window - 1:], smooth, label=key)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_title("demo training losses (moving average)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def run_demo(out, *, recipe=None, steps=None, minutes=None, seed=0, quiet=False, threads=THREADS, real_face=True):
    """The whole demo -> dict of the written paths and the step count (``real_face=False`` skips
    stage 0)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo(out, recipe, steps, minutes, seed, quiet, real_face)
    finally:
        torch.set_num_threads(previous)


def real_face_stage(out_dir, quiet):
    """Stage 0 -> its paths, or {} with a message when its optional packages are missing."""
    missing = [name for name in ("mediapipe", "skimage", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        _stage(f"skipping the real-face stage: it needs {', '.join(missing)} (pip install -r requirements/runtime.txt)",
               quiet)
        return {}
    started = time.perf_counter()
    _stage("animating the astronaut portrait (built-in mediapipe face model, geometric mode, no training)", quiet)
    written = write_real_face(out_dir)
    _stage(f"wrote {written['real_video']} and {written['real_grid']} in {time.perf_counter() - started:.1f} s", quiet)
    return {"real_video": written["real_video"], "real_grid": written["real_grid"]}


def _run_demo(out, recipe, steps, minutes, seed, quiet, real_face=True):
    recipe = dataclasses.replace(recipe or DemoRecipe(), **({"steps": steps} if steps else {}))
    out_dir = pathlib.Path(out)
    claim_output(out_dir)
    real = real_face_stage(out_dir, quiet) if real_face else {}
    started = time.perf_counter()
    _stage(f"synthesising {recipe.clips} training clips and 2 held-out clips (toy head, "
           f"{recipe.resolution}x{recipe.resolution})", quiet)
    train_dir, heldout_dir = make_data(out_dir, recipe, seed)
    _stage(f"training the small model ({'~%g min' % minutes if minutes else f'{recipe.steps} steps'}, CPU)", quiet)
    checkpoint, trained = train_model(out_dir, train_dir, recipe, seed, minutes=minutes, quiet=quiet)
    rows, driving = reenact_heldout(checkpoint, heldout_dir, quiet)
    video = out_dir / "result.mp4"
    encode_video(video, (_panel(row) for row in rows), fps=12.5, codec="h264")
    picks = diverse_frames(driving["pose"], driving["beta"], GRID_ROWS)
    grid = write_grid(out_dir / "grid.png", rows, picks, trained, seed)
    loss = write_loss_plot(out_dir / "loss.png", checkpoint.parent.parent / "log.jsonl")
    _stage(f"wrote {video}, {grid}" + (f", {loss}" if loss else " (no loss plot: matplotlib is not installed)")
           + f" in {time.perf_counter() - started:.0f} s", quiet)
    return {"video": video, "grid": grid, "loss": loss, "checkpoint": checkpoint, "steps": trained, **real}
