"""``reenact eval``: self-reenactment metrics of a trained generator on a prepared dataset.

Protocol (DESIGN-NOTES.md, "Evaluation"): for every clip, the source is one frame (``--source-frame``,
the first by default) and every other frame of the same clip drives it. ``P_s`` and ``P_d'`` come
from the dataset's stored parameters, exactly as in training (:func:`reenact.data.pncc.prepare_batch`):
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
  weights (:mod:`reenact.eval.networks`), otherwise reported as not computed.

Every metric is reported for the model and, on the same pairs, for two baselines: "geometric
warp" (the training-free warp of the source along the identity-matched mesh, :mod:`reenact.warp`)
and "copy source" (the source frame unchanged). A model that does not beat "copy source" has not
learnt to reenact.

Outputs under ``--out``: ``eval.md`` (a markdown table, one column per method) and ``eval.json``
(every number; the model's under ``metrics``, the baselines' under ``baselines``; per clip).

This module runs it; :mod:`.metrics`, :mod:`.refit` and :mod:`.report` hold the parts.
"""
import pathlib
import time

import numpy as np
import torch

from .. import output_folders
from ..data.pncc import batch_geometric, prepare_batch
from ..data.dataset import ClipDataset, check_parameter_sizes
from ..data.format import DatasetError, dataset_face_model
from ..data.loaders import FallbackLoader
from ..data.pairs import NO_AUGMENTATION, PairSpec
from ..data.video import MediaError
from ..face3d.detectors import make_detector
from ..face3d.loading import load_model
from ..progress import progress_bar
from ..training.checkpoints import load_generator, read_checkpoint_meta
from ..training.errors import TrainingError
from . import networks as feature_networks
from .metrics import GaussianStatistics, cosine_similarity, frechet_distance, image_metrics
from .options import EvalError, device_of, first_line
from .refit import detect_landmarks, pose_expression_errors
from .report import COPY_SOURCE, GEOMETRIC, METHODS, MODEL, write_report

NOT_COMPUTED_NO_WEIGHTS = "not computed (no weights given)"


# -- pairs and generation --------------------------------------------------------------------------

def self_reenactment_pairs(frame_counts, source_frame=0):
    """Per clip, ``source_frame`` driven by every other frame -> (list of PairSpec, skipped list).

    Clips with no frame besides ``source_frame`` are skipped: ``skipped`` lists (clip number,
    reason). Pairs carry no augmentation (no flip, no colour jitter).
    """
    specs, skipped = [], []
    for clip, frames in enumerate(int(n) for n in frame_counts):
        if source_frame >= frames:
            skipped.append((clip, f"{frames} frames: the source frame {source_frame} is past its end"))
            continue
        specs += [PairSpec(clip, source_frame, driving, False, (1.0, 1.0, 1.0), 0.0, False)
                  for driving in range(frames) if driving != source_frame]
    return specs, skipped


def repeats_of_the_source(batch):
    """How many pairs of a batch drive with a frame bit-identical to their source frame.

    Another frame of a real clip never equals the source exactly, unless the clip's encoder repeated a
    near-static frame (`reenact prepare` at 64 px did before 2026-12-07): the stored parameters then
    describe a frame the pixels no longer show, and "copy source" scores the PSNR cap on the pair.
    """
    same = (batch["source"] == batch["driving"]).flatten(1).all(1)
    return int(same.sum())


def _fixed_pair_loader(dataset, specs, batch_size):
    """A fallback loader (PyAV decoding, no augmentation) that yields ``specs`` in order, once."""
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


def geometric_baseline(face_model, batch, dataset_size):
    """The training-free geometric warp (:func:`reenact.warp.geometric_reenact`) of a
    :func:`generate` batch's source by its driving parameters, at the batch's resolution, in
    [-1, 1], the mouth interior darkened as ``reenact reenact`` does (what a model with
    ``geometric_input`` is given, :func:`reenact.data.pncc.batch_geometric`)."""
    return batch_geometric(face_model, batch, batch["source"], dataset_size)[:, :3]


def method_outputs(face_model, batch, dataset_size):
    """{method: (B, 3, R, R) in [-1, 1]} for one :func:`generate` batch: the model's output, the
    geometric warp and the source frame itself."""
    return {MODEL: batch["output"], GEOMETRIC: geometric_baseline(face_model, batch, dataset_size),
            COPY_SOURCE: batch["source"]}


def _open(options, device):
    """(generator, step, face model, dataset, feature networks) or EvalError."""
    try:
        meta = read_checkpoint_meta(options.checkpoint)
        step = int(meta["step"])
        generator, _ = load_generator(options.checkpoint, device=device)
    except TrainingError as err:
        raise EvalError(f"--checkpoint: {first_line(err)}") from None
    name = options.face_model
    if name is None:  # the model the checkpoint was trained with, else the one the dataset names
        trained = meta.get("options", {}).get("face_model") if isinstance(meta.get("options"), dict) else None
        name = trained if isinstance(trained, str) else (dataset_face_model(options.data) or "toy")
    try:
        face_model = load_model(name)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise EvalError(f"--face-model: {first_line(err)}") from None
    try:
        dataset = ClipDataset(options.data, max_skip_fraction=1.0)
    except (DatasetError, MediaError) as err:
        raise EvalError(f"--data {options.data}: {first_line(err)}") from None
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
            try:
                networks[kind] = feature_networks.load_feature_network(kind, path).to(device)
            except (FileNotFoundError, ValueError, ImportError) as err:
                text = str(err)
                if text.startswith("could not read"):  # torch's weights-only refusal, many lines
                    text = (f"{path} is neither .safetensors nor a weights-only torch.save state dict; eval never "
                            f"unpickles other objects (convert the weights to .safetensors)")
                raise EvalError(f"{flag}: {first_line(text)}") from None
    return generator, step, face_model, dataset, networks


def _detector(name, face_model=None):
    """(detector or None, reason when None)."""
    if name == "none":
        return None, "not computed (--detector none)"
    if getattr(face_model, "dense", False) and name != "mediapipe":
        return None, f"not computed (the {face_model.name!r} model re-fits mediapipe's dense mesh; --detector {name} has none)"
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
    device = device_of(options.device)
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
    bar = progress_bar(len(specs), "eval", "frame", options.progress)
    collected = {key: [] for key in ("clip", "frame_driving", "beta_driving", "pose_driving", "landmarks_driving",
                                     "landmarks_frame", "dense_frame", "id_driving")}
    dense = getattr(face_model, "dense", False)  # the re-fit reads the detected mesh
    per_method = {name: {"l1": [], "psnr": [], "ssim": [], "landmarks_output": [], "dense_output": [], "id_output": []}
                  for name in METHODS}
    statistics = {name: GaussianStatistics() for name in METHODS + ("driving",)}
    repeats = 0
    try:
        for batch in generate(generator, face_model, dataset, specs, options.batch_size, device):
            with torch.no_grad():
                outputs = method_outputs(face_model, batch, dataset.size)
            for key in ("clip", "frame_driving", "beta_driving", "pose_driving", "landmarks_driving"):
                collected[key].append(batch[key])
            repeats += repeats_of_the_source(batch)
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
        "clips": len(per_clip), "pairs": int(scores["l1"].size), "pairs_repeating_the_source": repeats,
        "skipped_clips": [{"clip": c, "reason": r} for c, r in skipped],
        "metrics": metrics, "baselines": {name: method_metrics[name] for name in METHODS if name != MODEL},
        "per_clip": per_clip, "seconds": time.perf_counter() - started,
    }
    write_report(results, options.out_dir(), inputs=[pathlib.Path(options.checkpoint)])
    return results
