"""``reenact train``: single-process training of the reenactment model with exact resume.

One step is a generator step then a discriminator step (Adam for both)::

    batch -> P_s, P_d' (batch_pncc, on the training device) -> G(source, P_s, P_d')
          -> generator_loss -> G step -> discriminator_loss(output.detach()) -> D step

Run directory (``--out``):

- ``config.json``: the ReenactorConfig of the run;
- ``checkpoints/ckpt-<step>.safetensors``: one file per checkpoint, written atomically (temp file
  in the same directory, fsync, ``os.replace``). Its tensors are the weights of G and D
  (``G/...``, ``D/...``), the flattened Adam states (``optim_G/state/<param>/<key>``) and the
  tensor parts of the RNG states (``rng/...``); its safetensors metadata holds one small JSON
  document (key ``reenact_train``): step, data position (epoch and batches consumed in it), the
  optimisers' param groups, the non-tensor RNG state, the config and the run options that fix the
  data order. The last ``--keep-last`` checkpoints are kept.
- ``log.jsonl``: one JSON object per step (step, epoch, losses, it/s);
- ``samples/step-<step>.png``: source | driving | P_d' | warped | output, one row per pair.

``--resume`` continues from the newest checkpoint exactly: same step, weights, optimiser state,
torch/numpy/python RNG states and data order. Checkpoints are only ever read with safetensors;
nothing here unpickles.
"""
import dataclasses
import json
import logging
import math
import os
import pathlib
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("reenact.train")

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d{8})\.safetensors$")
METADATA_KEY = "reenact_train"
FORMAT_VERSION = 1
RESOLUTIONS = (64, 128, 256)


class TrainingError(Exception):
    """A user-facing training failure (bad arguments, incompatible checkpoint, non-finite loss)."""


class NonFiniteLoss(TrainingError):
    """A loss became NaN or infinite; ``step`` and ``term`` name where."""

    def __init__(self, step, term, value):
        super().__init__(f"non-finite loss at step {step}: {term} = {value} "
                         f"(stopped; no checkpoint of this state was written)")
        self.step, self.term, self.value = step, term, value


@dataclasses.dataclass
class TrainOptions:
    """The options of ``reenact train`` (see :func:`add_train_parser` for their meaning)."""

    data: str
    out: str
    config: str = None
    steps: int = 1000
    batch_size: int = 8
    resolution: int = None
    ops: str = None
    perceptual: bool = True
    resume: bool = False
    keep_last: int = 3
    checkpoint_every: int = 500
    sample_every: int = None
    seed: int = 0
    loader: str = "auto"
    device: str = None
    face_model: str = "toy"
    lr_g: float = 1e-4
    lr_d: float = 4e-4
    betas: tuple = (0.5, 0.999)
    num_workers: int = 0
    progress: bool = True

    def validate(self):
        def positive_int(name, minimum=1):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                flag = "--" + name.replace("_", "-")
                raise TrainingError(f"{flag} must be an integer >= {minimum}, got {value!r}")

        for name in ("steps", "batch_size", "keep_last", "checkpoint_every"):
            positive_int(name)
        if self.sample_every is not None:
            positive_int("sample_every")
        positive_int("num_workers", 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise TrainingError(f"--seed must be an integer >= 0, got {self.seed!r}")
        if self.resolution is not None and self.resolution not in RESOLUTIONS:
            raise TrainingError(f"--resolution must be one of {RESOLUTIONS}, got {self.resolution!r}")
        if self.ops is not None and self.ops not in ("fused", "reference"):
            raise TrainingError(f"--ops must be 'fused' or 'reference', got {self.ops!r}")
        if self.loader not in ("auto", "dali", "fallback"):
            raise TrainingError(f"--loader must be 'auto', 'dali' or 'fallback', got {self.loader!r}")
        for name in ("lr_g", "lr_d"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise TrainingError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value!r}")
        if not pathlib.Path(self.data).is_dir():
            raise TrainingError(f"--data is not a directory: {self.data}")
        out = pathlib.Path(self.out)
        if out.exists() and not out.is_dir():
            raise TrainingError(f"--out must be a directory: {out}")


# -- configuration ---------------------------------------------------------------------------------

def build_config(options):
    """The ReenactorConfig of a fresh run: ``--config`` (or the small preset) with the command-line
    overrides (``--resolution``, ``--ops``, ``--no-perceptual``) applied."""
    from .model import ReenactorConfig

    if options.config is not None:
        try:
            config = ReenactorConfig.from_json(options.config)
        except (FileNotFoundError, ValueError, TypeError) as err:
            raise TrainingError(f"--config: {err}") from None
    else:
        config = ReenactorConfig.small(options.resolution or 64)
    data = config.to_dict()
    if options.resolution is not None:
        data["model"]["resolution"] = options.resolution
    if options.ops is not None:
        data["model"]["ops"] = options.ops
    if not options.perceptual:
        data["loss"]["perceptual"] = 0.0
    if data["model"]["resolution"] not in RESOLUTIONS:
        raise TrainingError(f"the config's model.resolution must be one of {RESOLUTIONS}, "
                            f"got {data['model']['resolution']!r} (or pass --resolution)")
    return ReenactorConfig.from_dict(data)


# -- data ------------------------------------------------------------------------------------------

class DataStream:
    """Endless batches from a loader, epoch after epoch, that knows its position.

    ``epoch`` is the current epoch and ``position`` the number of its batches already consumed, so
    ``DataStream(loader, epoch, position)`` continues exactly where a stream with that state was.
    A resumed epoch runs the loader on the rest of its schedule (both loaders take their batches
    from ``schedule()``), so the skipped batches are not decoded. Batches are fetched under
    ``torch.random.fork_rng``: a DataLoader draws its base seed from the global torch RNG when its
    iterator starts, which would otherwise differ between a resumed and an uninterrupted run.
    """

    def __init__(self, loader, epoch=0, position=0):
        self.loader, self.epoch, self.position = loader, int(epoch), int(position)
        self._iterator = None

    def _start_epoch(self):
        loader = self.loader
        loader.set_epoch(self.epoch)
        loader.__dict__.pop("schedule", None)
        if self.position:
            remaining = loader.schedule()[self.position:]
            if not remaining:
                # The state was saved after the epoch's last batch: start the next epoch here,
                # because DALI refuses an empty schedule where the fallback would just stop.
                self.epoch, self.position = self.epoch + 1, 0
                return self._start_epoch()
            loader.schedule = lambda: remaining
        self._iterator = iter(loader)

    def next(self):
        for _ in range(2):
            if self._iterator is None:
                self._start_epoch()
            try:
                with torch.random.fork_rng(devices=[]):
                    batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.loader.__dict__.pop("schedule", None)
                self.epoch, self.position = self.epoch + 1, 0
                continue
            self.position += 1
            return batch
        raise TrainingError(f"the loader gave no batch for epoch {self.epoch}")

    def close(self):
        self._iterator = None
        self.loader.__dict__.pop("schedule", None)


def _resize(images, size, mode):
    if images.shape[-1] == size:
        return images
    if images.shape[-1] > size:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode=mode, align_corners=False)


def prepare_batch(batch, face_model, resolution, device):
    """(source, driving, P_s, P_d') on ``device`` at ``resolution``. PNCCs are rendered at the
    dataset's crop size (the poses are in its pixels) and resized with the images."""
    from .data.pncc import batch_pncc

    size = int(batch["source"].shape[-1])
    pncc = batch_pncc(face_model, batch, size=size, device=device)
    source = _resize(batch["source"].to(device), resolution, "bilinear")
    driving = _resize(batch["driving"].to(device), resolution, "bilinear")
    return (source, driving, _resize(pncc["pncc_source"], resolution, "bilinear"),
            _resize(pncc["pncc_driving"], resolution, "bilinear"))


# -- checkpoints -----------------------------------------------------------------------------------

def _flatten_optimizer(optimizer, prefix):
    state = optimizer.state_dict()
    tensors, extra = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}/state/{index}/{key}"] = value
            else:
                extra[f"{index}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "state_extra": extra}


def _unflatten_optimizer(tensors, prefix, meta):
    state = {}
    start = prefix + "/state/"
    for name, value in tensors.items():
        if name.startswith(start):
            index, key = name[len(start):].split("/", 1)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["state_extra"].items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _rng_state():
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{index}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss]}
    return tensors, meta


def _set_rng_state(tensors, meta):
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((name for name in tensors if name.startswith("rng/cuda/")), key=lambda n: int(n.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[name] for name in cuda])
    kind, pos, has_gauss, cached = meta["numpy"]
    keys = tensors["rng/numpy_keys"].numpy().view(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def _atomic_write(path, data):
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    try:
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def checkpoint_path(run_dir, step):
    return pathlib.Path(run_dir) / CHECKPOINT_DIR / f"ckpt-{step:08d}.safetensors"


def list_checkpoints(run_dir):
    """The run's checkpoint files, oldest first -> list of (step, path). Only ``.safetensors``
    files named ``ckpt-<8 digits>.safetensors`` count; anything else in the directory is ignored."""
    directory = pathlib.Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(path, generator, discriminator, optimizer_g, optimizer_d, meta):
    """Write one checkpoint file atomically (see the module docstring for its layout)."""
    from safetensors.torch import save

    tensors = {}
    for prefix, module in (("G", generator), ("D", discriminator)):
        for name, value in module.state_dict().items():
            tensors[f"{prefix}/{name}"] = value
    meta = dict(meta)
    for prefix, optimizer in (("optim_G", optimizer_g), ("optim_D", optimizer_d)):
        flat, extra = _flatten_optimizer(optimizer, prefix)
        tensors.update(flat)
        meta[prefix] = extra
    rng_tensors, meta["rng"] = _rng_state()
    tensors.update(rng_tensors)
    tensors = {name: value.detach().to("cpu").contiguous().clone() for name, value in tensors.items()}
    data = save(tensors, metadata={METADATA_KEY: json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, data)


def read_checkpoint(path):
    """(tensors, meta) of a checkpoint file, read with safetensors only (never unpickled)."""
    from safetensors import SafetensorError
    from safetensors import safe_open

    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        raise TrainingError(f"refusing to read {path}: checkpoints are .safetensors files")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise TrainingError(f"cannot read checkpoint {path}: {err}") from None
    if METADATA_KEY not in metadata:
        raise TrainingError(f"{path} is not a reenact training checkpoint (no '{METADATA_KEY}' metadata)")
    meta = json.loads(metadata[METADATA_KEY])
    if meta.get("format_version") != FORMAT_VERSION:
        raise TrainingError(f"{path} has checkpoint format {meta.get('format_version')!r}; "
                            f"this version reads {FORMAT_VERSION}")
    return tensors, meta


def _module_state(tensors, prefix):
    start = prefix + "/"
    return {name[len(start):]: value for name, value in tensors.items() if name.startswith(start)}


def load_generator(path, device="cpu", ops=None):
    """The generator of a training checkpoint, in eval mode -> (Reenactor, ReenactorConfig)."""
    from .model import Reenactor, ReenactorConfig

    tensors, meta = read_checkpoint(path)
    config = ReenactorConfig.from_dict(meta["config"])
    generator = Reenactor(config.model)
    generator.load_state_dict(_module_state(tensors, "G"))
    if ops is not None:
        generator.set_ops(ops)
    return generator.to(device).eval(), config


def prune_checkpoints(run_dir, keep_last):
    """Delete all but the newest ``keep_last`` checkpoints."""
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        path.unlink()


# -- logging ---------------------------------------------------------------------------------------

def _truncate_log(path, step):
    """Drop log lines of steps after ``step`` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("step", 0) <= step:
            kept.append(line)
    _atomic_write(path, ("\n".join(kept) + "\n" if kept else "").encode())


def save_sample_grid(path, source, driving, driving_pncc, outputs, max_rows=8):
    """A PNG of :func:`preview_panels` rows (source | driving | P_d' | warped | output)."""
    from PIL import Image

    from .model import preview_panels

    panels = preview_panels(source[:max_rows], driving[:max_rows], driving_pncc[:max_rows],
                            {key: outputs[key][:max_rows] for key in ("flow", "output")})
    grid = torch.cat(list(panels), dim=1)  # rows stacked: (3, B H, 5 W)
    array = (grid.permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(array).save(buffer_path, format="PNG")
    os.replace(buffer_path, path)


def _tensorboard(run_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(pathlib.Path(run_dir) / "tensorboard"))


def _progress(total, initial, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr)


# -- training --------------------------------------------------------------------------------------

def _check_finite(step, result, prefix):
    values = {f"{prefix}/{name}": value for name, value in result.terms.items()}
    values[f"{prefix}/total"] = result.total.detach()
    stacked = torch.stack([v.float().reshape(()) for v in values.values()])
    if bool(torch.isfinite(stacked).all()):
        return
    for name, value in values.items():
        if not bool(torch.isfinite(value).all()):
            raise NonFiniteLoss(step, name, float(value))


def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


#: Options that fix the data order and the model; a resumed run must use the same values.
_FIXED_ON_RESUME = ("batch_size", "seed")


class Trainer:
    """Holds the models, optimisers, data stream and step of one run (see :func:`train`)."""

    def __init__(self, options):
        from .data.loaders import make_loader
        from .face3d.morphable import load_model
        from .model import Reenactor, ReenactmentLoss, build_discriminator

        options.validate()
        self.options = options
        self.run_dir = pathlib.Path(options.out)
        self.device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        existing = list_checkpoints(self.run_dir)
        self.resumed_from = None
        if options.resume:
            if not existing:
                raise TrainingError(f"--resume: no checkpoint in {self.run_dir / CHECKPOINT_DIR}")
            self.resumed_from = existing[-1][1]
            tensors, meta = read_checkpoint(self.resumed_from)
            config = self._resumed_config(meta)
        else:
            if existing:
                raise TrainingError(f"{self.run_dir} already holds checkpoints; pass --resume to continue "
                                    f"that run or choose another --out")
            tensors, meta = None, None
            config = build_config(options)
        self.config = config

        _seed_everything(options.seed)
        try:
            self.face_model = load_model(options.face_model).to(self.device)
        except (FileNotFoundError, ValueError, ImportError) as err:
            raise TrainingError(f"--face-model: {err}") from None
        self.generator = Reenactor(config.model).to(self.device).train()
        self.discriminator = build_discriminator(config.model).to(self.device).train()
        try:
            self.losses = ReenactmentLoss(config.loss).to(self.device)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise TrainingError(f"the perceptual loss cannot be built ({err}); set "
                                f"loss.perceptual_weights_path in --config or pass --no-perceptual") from None
        betas = tuple(options.betas)
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=options.lr_g, betas=betas)
        self.optimizer_d = torch.optim.Adam(self.discriminator.parameters(), lr=options.lr_d, betas=betas)

        try:
            loader = make_loader(options.data, backend=options.loader, batch_size=options.batch_size,
                                 seed=options.seed, device="cpu", num_workers=options.num_workers)
        except ImportError as err:
            raise TrainingError(f"--loader {options.loader}: {err}") from None
        except ValueError as err:
            raise TrainingError(f"--data {options.data}: {err}") from None
        self.dataset_size = int(loader.dataset.size)
        model_names = {str(clip.params["model_name"]) for clip in loader.dataset.clips if "model_name" in clip.params}
        if model_names and model_names != {self.face_model.name}:
            raise TrainingError(f"the dataset was fitted with face model {sorted(model_names)}, but --face-model "
                                f"gives {self.face_model.name!r}")
        self.step, epoch, position = 0, 0, 0
        if meta is not None:
            epoch, position = self._restore(tensors, meta)
        self.stream = DataStream(loader, epoch, position)

    def _resumed_config(self, meta):
        from .model import ReenactorConfig

        options = self.options
        for name in _FIXED_ON_RESUME:
            saved = meta["options"][name]
            if getattr(options, name) != saved:
                raise TrainingError(f"--resume: --{name.replace('_', '-')} {getattr(options, name)} differs from "
                                    f"the checkpoint's {saved}; the data order would change")
        config = ReenactorConfig.from_dict(meta["config"])
        if options.config is not None or options.resolution is not None or not options.perceptual:
            wanted = build_config(options)
            wanted.model.ops = config.model.ops
            if wanted.to_dict() != config.to_dict():
                raise TrainingError("--resume: --config/--resolution/--no-perceptual give a different model or "
                                    "loss config than the checkpoint's; leave them out to resume")
        if options.ops is not None:
            config.model.ops = options.ops  # same weights, other kernels
        return config

    def _restore(self, tensors, meta):
        try:
            self.generator.load_state_dict(_module_state(tensors, "G"))
            self.discriminator.load_state_dict(_module_state(tensors, "D"))
            self.optimizer_g.load_state_dict(_unflatten_optimizer(tensors, "optim_G", meta["optim_G"]))
            self.optimizer_d.load_state_dict(_unflatten_optimizer(tensors, "optim_D", meta["optim_D"]))
        except (RuntimeError, ValueError, KeyError) as err:
            raise TrainingError(f"checkpoint {self.resumed_from} does not fit the model: {err}") from None
        _set_rng_state(tensors, meta["rng"])
        self.step = int(meta["step"])
        return int(meta["data"]["epoch"]), int(meta["data"]["position"])

    def _meta(self):
        options = self.options
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "data": {"epoch": self.stream.epoch, "position": self.stream.position, "loader": options.loader,
                     "dataset": str(pathlib.Path(options.data).resolve())},
            "config": self.config.to_dict(),
            "options": {"batch_size": options.batch_size, "seed": options.seed, "face_model": options.face_model},
            "time": time.time(),
        }

    def save(self):
        path = checkpoint_path(self.run_dir, self.step)
        save_checkpoint(path, self.generator, self.discriminator, self.optimizer_g, self.optimizer_d, self._meta())
        prune_checkpoints(self.run_dir, self.options.keep_last)
        return path

    def train_step(self):
        """One G step then one D step -> (log entry, (source, driving, P_d', outputs))."""
        step = self.step + 1
        batch = self.stream.next()
        source, driving, pncc_source, pncc_driving = prepare_batch(
            batch, self.face_model, self.config.model.resolution, self.device)
        outputs = self.generator(source, pncc_source, pncc_driving)
        g = self.losses.generator_loss(outputs, driving, pncc_driving, self.discriminator)
        _check_finite(step, g, "G")
        self.optimizer_g.zero_grad(set_to_none=True)
        g.total.backward()
        self.optimizer_g.step()
        d = self.losses.discriminator_loss(self.discriminator, outputs["output"].detach(), driving, pncc_driving)
        _check_finite(step, d, "D")
        self.optimizer_d.zero_grad(set_to_none=True)
        d.total.backward()
        self.optimizer_d.step()
        self.step = step
        entry = {"step": step, "epoch": self.stream.epoch, "G/total": float(g.total.detach())}
        entry.update({f"G/{k}": float(v) for k, v in g.terms.items()})
        entry["D/total"] = float(d.total.detach())
        entry.update({f"D/{k}": float(v) for k, v in d.terms.items() if k != "discriminator"})
        return entry, (source, driving, pncc_driving, outputs)


def train(options):
    """Run (or resume) training to ``options.steps`` -> the path of the last checkpoint."""
    trainer = Trainer(options)
    run_dir = trainer.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer.config.to_json(run_dir / "config.json")
    log_path = run_dir / "log.jsonl"
    if trainer.resumed_from is not None:
        _truncate_log(log_path, trainer.step)
        log.info("resumed from %s at step %d", trainer.resumed_from, trainer.step)
    elif log_path.exists():
        log_path.unlink()
    sample_every = options.sample_every or options.checkpoint_every
    writer = _tensorboard(run_dir)
    bar = _progress(options.steps, trainer.step, options.progress)
    last = trainer.resumed_from
    try:
        with open(log_path, "a") as log_file:
            started, timed = time.perf_counter(), 0
            while trainer.step < options.steps:
                tick = time.perf_counter()
                entry, sample = trainer.train_step()
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize(trainer.device)
                now = time.perf_counter()
                timed += 1
                entry["it_s"] = timed / max(now - started, 1e-9)
                entry["step_s"] = now - tick
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()
                step = trainer.step
                if writer is not None:
                    for key, value in entry.items():
                        if key not in ("step", "epoch"):
                            writer.add_scalar(key, value, step)
                if step % sample_every == 0 or step == options.steps:
                    save_sample_grid(run_dir / "samples" / f"step-{step:08d}.png", *sample)
                    if writer is not None:
                        from .model import preview_panels

                        panels = preview_panels(*sample[:3], sample[3])
                        writer.add_images("preview", panels[:8], step)
                if step % options.checkpoint_every == 0 or step == options.steps:
                    last = trainer.save()
                if bar is not None:
                    bar.set_postfix({"G": f"{entry['G/total']:.3f}", "D": f"{entry['D/total']:.3f}"}, refresh=False)
                    bar.update(1)
    finally:
        trainer.stream.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    return last


# -- command line ----------------------------------------------------------------------------------

def run_train(args):
    from .cli import CommandError

    options = TrainOptions(
        data=args.data, out=args.out, config=args.config, steps=args.steps, batch_size=args.batch_size,
        resolution=args.resolution, ops=args.ops, perceptual=not args.no_perceptual, resume=args.resume,
        keep_last=args.keep_last, checkpoint_every=args.checkpoint_every, sample_every=args.sample_every,
        seed=args.seed, loader=args.loader, device=args.device, face_model=args.face_model,
        lr_g=args.lr_g, lr_d=args.lr_d, num_workers=args.num_workers, progress=not args.quiet)
    try:
        last = train(options)
    except TrainingError as err:
        raise CommandError(str(err)) from None
    except RuntimeError as err:
        if options.device and "cuda" in str(err).lower():
            raise CommandError(f"--device {options.device}: {err}") from None
        raise
    print(f"trained to step {options.steps}; last checkpoint {last}")
    return 0


def add_train_parser(subparsers):
    parser = subparsers.add_parser(
        "train", help="train the reenactment model (single process; --resume continues exactly)",
        description="Train the generator and discriminator on a prepared dataset (`reenact prepare` or "
                    "`reenact synth`). Writes safetensors checkpoints, log.jsonl and sample grids to --out.")
    parser.add_argument("--data", required=True, help="dataset directory (with manifest.jsonl)")
    parser.add_argument("--out", required=True, help="run directory (created if needed)")
    parser.add_argument("--config", help="ReenactorConfig JSON file (default: the small preset)")
    parser.add_argument("--steps", type=int, default=1000, help="train until this step (default 1000)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (default 8)")
    parser.add_argument("--resolution", type=int, choices=RESOLUTIONS,
                        help="training resolution (default: the config's; 64 for the small preset)")
    parser.add_argument("--ops", choices=["fused", "reference"], help="correspondence ops (default: the config's)")
    parser.add_argument("--no-perceptual", action="store_true", help="switch the VGG-19 perceptual loss off")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep (default 3)")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    parser.add_argument("--sample-every", type=int, help="steps between sample grids (default: --checkpoint-every)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loader", default="auto", choices=["auto", "dali", "fallback"])
    parser.add_argument("--num-workers", type=int, default=0, help="fallback loader worker processes (default 0)")
    parser.add_argument("--device", help="training device (default: cuda when available, else cpu)")
    parser.add_argument("--face-model", default="toy", help="the face model the dataset was fitted with (default toy)")
    parser.add_argument("--lr-g", type=float, default=1e-4, help="generator Adam learning rate (default 1e-4)")
    parser.add_argument("--lr-d", type=float, default=4e-4, help="discriminator Adam learning rate (default 4e-4)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_train)
