"""The trainer of ``reenact train``: one generator step then one discriminator step per batch,
on one process or on every rank of a ``torchrun`` run (see :mod:`reenact.training` for the run
directory, the checkpoint layout, the batch semantics and what rank 0 owns)."""
import contextlib
import dataclasses
import importlib
import json
import logging
import math
import os
import pathlib
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from .. import output_folders, validation
from . import distributed
from .checkpoints import (
    CHECKPOINT_DIR,
    FORMAT_VERSION,
    _atomic_write,
    _module_state,
    _unflatten_optimizer,
    checkpoint_path,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    saved_world_size,
)
from .errors import NonFiniteLoss, TrainingError

log = logging.getLogger("reenact.train")

RESOLUTIONS = (64, 128, 256)
PRECISIONS = ("fp32", "bf16")


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
    overwrite: bool = False
    keep_last: int = 3
    checkpoint_every: int = 500
    sample_every: int = None
    seed: int = 0
    loader: str = "auto"
    device: str = None
    face_model: str = None  # None: the model the dataset was fitted with (validate() resolves it)
    lr_g: float = 1e-4
    lr_d: float = 4e-4
    betas: tuple = (0.5, 0.999)
    num_workers: int = 0
    progress: bool = True
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

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
        if self.precision not in PRECISIONS:
            raise TrainingError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.loader not in ("auto", "dali", "fallback"):
            raise TrainingError(f"--loader must be 'auto', 'dali' or 'fallback', got {self.loader!r}")
        for name in ("lr_g", "lr_d"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise TrainingError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value!r}")
        if not pathlib.Path(self.data).is_dir():
            raise TrainingError(f"--data is not a directory: {self.data}")
        if self.face_model is None:
            from ..data.format import dataset_face_model

            self.face_model = dataset_face_model(self.data) or "toy"
        out = pathlib.Path(self.out)
        if out.exists() and not out.is_dir():
            raise TrainingError(f"--out must be a directory: {out}")


# -- configuration ---------------------------------------------------------------------------------

def build_config(options):
    """The ReenactorConfig of a fresh run: ``--config`` (or the small preset with
    ``geometric_input``) with the command-line
    overrides (``--resolution``, ``--ops``, ``--no-perceptual``) applied."""
    from ..model import ReenactorConfig

    if options.config is not None:
        try:
            config = ReenactorConfig.from_json(options.config)
        except (FileNotFoundError, ValueError, TypeError) as err:
            raise TrainingError(f"--config: {err}") from None
    else:
        # With the geometric warp as an input: it beats the PNCC-only generator (issue 13, bench/RESULTS.md).
        config = ReenactorConfig.small(options.resolution or 64, geometric_input=True)
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


def dataset_crop_scale(clips):
    """How the dataset frames its faces: the median over valid frames of crop side over landmark box
    side (``reenact prepare``'s ``crop_scale``; about 2 for ``reenact synth``), or None without
    landmarks. Checkpoints record it so that inference crops new faces the way training saw them."""
    from ..data.prepare import landmark_box_side

    ratios = []
    for clip in clips:
        landmarks, size = clip.params.get("landmarks"), clip.params.get("image_size")
        if landmarks is None or size is None:
            continue
        landmarks = np.asarray(landmarks, dtype=np.float64)
        valid = np.asarray(clip.params.get("valid", np.ones(len(landmarks), bool)), dtype=bool)
        side = landmark_box_side(landmarks)[valid]
        ratios.append(float(size) / side[side > 0])
    if not ratios:
        return None
    return round(float(np.median(np.concatenate(ratios))), 4)


def prepare_batch(batch, face_model, resolution, device, ops=None, geometric=False):
    """(source, driving, P_s, P_d', geometric) on ``device`` at ``resolution``. PNCCs are rendered
    at the dataset's crop size (the poses are in its pixels) and resized with the images, by
    ``ops.render_pncc`` (default: the fused op; ``--ops reference`` renders with the reference).
    ``geometric`` (``ModelConfig.geometric_input``): the last item is the geometric warp input
    (B, 4, R, R) of :func:`reenact.data.pncc.batch_geometric`, warped at ``resolution``; else None."""
    from ..data.pncc import batch_geometric, batch_pncc

    size = int(batch["source"].shape[-1])
    pncc = batch_pncc(face_model, batch, size=size, device=device, ops=ops)
    source = _resize(batch["source"].to(device), resolution, "bilinear")
    driving = _resize(batch["driving"].to(device), resolution, "bilinear")
    warp = batch_geometric(face_model, batch, source, size) if geometric else None
    return (source, driving, _resize(pncc["pncc_source"], resolution, "bilinear"),
            _resize(pncc["pncc_driving"], resolution, "bilinear"), warp)


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

    from ..model import preview_panels

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


# -- precision, layout, compilation ---------------------------------------------------------------

def _cpu_bf16_autocast_works():
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            probe = F.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1))
    except RuntimeError:
        return False
    return probe.dtype == torch.bfloat16


def autocast_dtype(precision, device):
    """The autocast dtype of ``--precision`` on ``device`` (None: fp32, no autocast)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):  # native bf16 from Ampere on
            raise TrainingError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support "
                                f"(compute capability 8.0 or newer is needed); use --precision fp32")
    elif device.type == "cpu":
        if not _cpu_bf16_autocast_works():
            raise TrainingError("--precision bf16: this torch build cannot autocast to bfloat16 on the CPU; "
                                "use --precision fp32")
    else:
        raise TrainingError(f"--precision bf16 runs on CUDA or the CPU, not on {device}")
    return torch.bfloat16


def check_compile_available(device):
    """Raise TrainingError when ``torch.compile`` (TorchInductor) cannot run on ``device``."""
    try:
        dynamo = importlib.import_module("torch._dynamo")
        cpp_builder = importlib.import_module("torch._inductor.cpp_builder")
    except ImportError as err:
        raise TrainingError(f"--compile: this torch has no TorchInductor ({err}); leave --compile out") from None
    if not dynamo.is_dynamo_supported():
        raise TrainingError(f"--compile: torch.compile does not support Python {sys.version.split()[0]} with "
                            f"torch {torch.__version__}; leave --compile out")
    if device.type == "cpu":
        try:
            cpp_builder.get_cpp_compiler()
        except (RuntimeError, OSError, ImportError) as err:
            raise TrainingError(f"--compile on the CPU needs a C++ compiler for TorchInductor ({err}); "
                                f"install one (g++) or leave --compile out") from None


@contextlib.contextmanager
def _compile_errors(enabled):
    """Turn a TorchInductor/Dynamo failure of the first compiled call into a TrainingError."""
    if not enabled:
        yield
        return
    from torch._dynamo.exc import BackendCompilerFailed

    try:
        yield
    except BackendCompilerFailed as err:
        cause = getattr(err, "inner_exception", None) or err
        reason = (str(cause).strip().splitlines() or [""])[0]
        raise TrainingError(f"--compile: torch.compile failed ({type(cause).__name__}: {reason}); "
                            f"leave --compile out") from None


# -- training --------------------------------------------------------------------------------------

def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_rank(seed, rank, step=0):
    """Seed this process's torch, numpy and python RNGs for training-time randomness.

    The models are built from ``seed`` alone, so every rank starts from the same weights; then
    each rank takes its own streams, derived from (seed, rank, step), so that random draws
    inside a step (dropout, noise, augmentation on the device) are independent between ranks,
    not the same numbers applied to different samples.
    """
    words = np.random.SeedSequence([seed, rank, step]).generate_state(2)
    value = (int(words[0]) << 32) | int(words[1])
    random.seed(value)
    np.random.seed(words)
    torch.manual_seed(value)


#: Options that fix the data order and the model; a resumed run must use the same values.
_FIXED_ON_RESUME = ("batch_size", "seed")


class Trainer:
    """Holds the models, optimisers, data stream and step of one process of a run (see :func:`train`).

    ``generator`` and ``discriminator`` are the plain modules (their weights are what checkpoints
    hold); ``generator_step_module`` and ``discriminator_step_module`` are what a step calls: the
    same modules wrapped in DDP under torchrun and in ``torch.compile`` with ``--compile``.
    """

    def __init__(self, options, world=None):
        options.validate()
        self.options = options
        self.world = world or distributed.World.from_env()
        if options.batch_size % self.world.size:
            raise TrainingError(f"--batch-size {options.batch_size} is the global batch; it must be a multiple of "
                                f"the world size {self.world.size} (each rank takes batch-size / world size)")
        self.rank_batch = options.batch_size // self.world.size
        self.run_dir = pathlib.Path(options.out)
        self.device = distributed.training_device(options.device, self.world)
        self.autocast_dtype = autocast_dtype(options.precision, self.device)
        if options.compile:
            check_compile_available(self.device)
        existing = list_checkpoints(self.run_dir)
        try:
            # A folder with checkpoints is a run (perhaps from before runs were marked): --resume may continue it.
            output_folders.check_claim(self.run_dir, "train",
                                overwrite=options.overwrite or (options.resume and bool(existing)),
                                escape="--overwrite (or --resume to continue a run there)")
        except output_folders.OutputFolderError as err:
            raise TrainingError(str(err)) from None
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
        self._owns_group = distributed.init_process_group(self.world, self.device)
        try:
            self._build(tensors, meta)
        except BaseException:
            self.close()
            raise

    def _build(self, tensors, meta):
        from ..data.dataset import check_parameter_sizes
        from ..data.loaders import make_loader
        from ..face3d.morphable import load_model
        from ..model import Reenactor, ReenactmentLoss, build_discriminator, get_ops

        options, config, world = self.options, self.config, self.world
        _seed_everything(options.seed)  # the same initial weights on every rank
        try:
            self.face_model = load_model(options.face_model).to(self.device)
        except (FileNotFoundError, ValueError, ImportError) as err:
            raise TrainingError(f"--face-model: {err}") from None
        self.generator = Reenactor(config.model).to(self.device).train()
        # The training PNCCs are rendered by the model's ops too: --ops reference swaps every op.
        self.pncc_ops = get_ops(config.model.ops)
        self.discriminator = build_discriminator(config.model).to(self.device).train()
        if options.channels_last:
            self.generator.to(memory_format=torch.channels_last)
            self.discriminator.to(memory_format=torch.channels_last)
        try:
            self.losses = ReenactmentLoss(config.loss).to(self.device)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise TrainingError(f"the perceptual loss cannot be built ({err}); set "
                                f"loss.perceptual_weights_path in --config or pass --no-perceptual") from None
        _seed_rank(options.seed, world.rank)
        betas = tuple(options.betas)
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=options.lr_g, betas=betas)
        self.optimizer_d = torch.optim.Adam(self.discriminator.parameters(), lr=options.lr_d, betas=betas)

        try:
            loader = make_loader(options.data, backend=options.loader, batch_size=self.rank_batch,
                                 seed=options.seed, device="cpu", num_workers=options.num_workers,
                                 shard_id=world.rank, num_shards=world.size)
        except ImportError as err:
            raise TrainingError(f"--loader {options.loader}: {err}") from None
        except ValueError as err:
            raise TrainingError(f"--data {options.data}: {err}") from None
        self.crop_scale = dataset_crop_scale(loader.dataset.clips)
        model_names = {str(clip.params["model_name"]) for clip in loader.dataset.clips if "model_name" in clip.params}
        if model_names and model_names != {self.face_model.name}:
            raise TrainingError(f"the dataset was fitted with face model {sorted(model_names)}, but --face-model "
                                f"gives {self.face_model.name!r}")
        try:
            check_parameter_sizes(loader.dataset.clips, self.face_model)
        except ValueError as err:
            raise TrainingError(f"--data {options.data}: {err}") from None
        self.step, epoch, position = 0, 0, 0
        if meta is not None:
            epoch, position = self._restore(tensors, meta)
        self.stream = DataStream(loader, epoch, position)
        self.generator_step_module = self._wrap(self.generator)
        self.discriminator_step_module = self._wrap(self.discriminator)

    def _wrap(self, module):
        if self.world.distributed:
            module = distributed.wrap_ddp(module, self.device)
        if self.options.compile:
            module = torch.compile(module)
        return module

    def close(self):
        """Release the data stream and, when this trainer created it, the process group."""
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.close()
        if self._owns_group:
            distributed.destroy_process_group()
            self._owns_group = False

    def _resumed_config(self, meta):
        from ..model import ReenactorConfig

        options = self.options
        for name in _FIXED_ON_RESUME:
            if name not in meta["options"]:
                raise TrainingError(f"--resume: {self.resumed_from} does not record options.{name}")
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
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
            first = validation.one_line(err)[:300]
            raise TrainingError(f"checkpoint {self.resumed_from} does not fit the model: {first}") from None
        self.step = int(meta["step"])
        if self.step > self.options.steps:
            raise TrainingError(f"--resume: {self.resumed_from} is at step {self.step}, beyond --steps "
                                f"{self.options.steps}; pass a larger --steps to train further")
        saved = saved_world_size(meta)
        if saved == self.world.size:
            try:
                restore_rng_state(tensors, meta, self.world.rank)
            except (KeyError, ValueError, TypeError, RuntimeError) as err:
                raise TrainingError(f"checkpoint {self.resumed_from}: its RNG state cannot be restored "
                                    f"({type(err).__name__}: {err})") from None
        else:
            # The data order survives (--batch-size is global), the per-rank RNG streams cannot.
            if self.world.is_main:
                log.warning("%s was written by %d process(es), this run has %d: the data order continues "
                            "exactly, but each rank's RNG streams are re-derived from (seed, rank, step)",
                            self.resumed_from, saved, self.world.size)
            _seed_rank(self.options.seed, self.world.rank, self.step)
        if not {"epoch", "position"} <= set(meta["data"]):
            raise TrainingError(f"--resume: {self.resumed_from} does not record its data position (data.epoch, "
                                f"data.position)")
        return int(meta["data"]["epoch"]), int(meta["data"]["position"])

    def _meta(self):
        options = self.options
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "data": {"epoch": self.stream.epoch, "position": self.stream.position, "loader": options.loader,
                     "dataset": str(pathlib.Path(options.data).resolve()), "crop_scale": self.crop_scale},
            "config": self.config.to_dict(),
            "options": {"batch_size": options.batch_size, "seed": options.seed, "face_model": options.face_model,
                        "world_size": self.world.size, "precision": options.precision,
                        "channels_last": options.channels_last, "compile": options.compile},
            "time": time.time(),
        }

    def save(self):
        """Write a checkpoint of this step (collective under torchrun: every rank sends its RNG
        state; rank 0 writes the file and prunes) -> its path."""
        path = checkpoint_path(self.run_dir, self.step)
        states = distributed.gather_objects(rng_state(), self.world)
        if self.world.is_main:
            save_checkpoint(path, self.generator, self.discriminator, self.optimizer_g, self.optimizer_d,
                            self._meta(), states)
            prune_checkpoints(self.run_dir, self.options.keep_last)
        return path

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _loss_values(self, step, result, prefix):
        """The loss terms and total of ``result``, averaged over the ranks (the global batch's
        values) -> {"<prefix>/<term>": float}; NonFiniteLoss on every rank alike when one is not
        finite."""
        names = [f"{prefix}/{name}" for name in result.terms] + [f"{prefix}/total"]
        values = list(result.terms.values()) + [result.total.detach()]
        stacked = torch.stack([value.float().reshape(()).to(self.device) for value in values])
        floats = distributed.mean_over_ranks(stacked, self.world).tolist()
        for name, value in zip(names, floats):
            if not math.isfinite(value):
                raise NonFiniteLoss(step, name, value)
        return dict(zip(names, floats))

    def train_step(self):
        """One G step then one D step (none when the loss has no GAN term) -> (log entry, (source,
        driving, P_d', outputs)).

        The entry's losses are the means over the global batch (all ranks)."""
        step = self.step + 1
        batch = self.stream.next()
        images = prepare_batch(batch, self.face_model, self.config.model.resolution, self.device,
                               self.pncc_ops, self.config.model.geometric_input)
        if self.options.channels_last:
            images = [None if image is None else image.contiguous(memory_format=torch.channels_last)
                      for image in images]
        source, driving, pncc_source, pncc_driving, geometric = images
        with _compile_errors(self.options.compile):
            with self._autocast():
                outputs = self.generator_step_module(source, pncc_source, pncc_driving, geometric)
                # The plain discriminator: generator_loss runs it with detached parameters.
                g = self.losses.generator_loss(outputs, driving, pncc_driving, self.discriminator)
            g_values = self._loss_values(step, g, "G")
            self.optimizer_g.zero_grad(set_to_none=True)
            g.total.backward()
            self.optimizer_g.step()
            d_values = {}
            # With both GAN weights at 0 nothing reads the discriminator: training it would only
            # cost time (a quarter of a step in the demo's L1-only recipe).
            if self.losses.needs_discriminator:
                with self._autocast():
                    d = self.losses.discriminator_loss(self.discriminator_step_module, outputs["output"].detach(),
                                                       driving, pncc_driving)
                d_values = self._loss_values(step, d, "D")
                self.optimizer_d.zero_grad(set_to_none=True)
                d.total.backward()
                self.optimizer_d.step()
        self.step = step
        entry = {"step": step, "epoch": self.stream.epoch, "G/total": g_values.pop("G/total")}
        entry.update(g_values)
        if d_values:
            entry["D/total"] = d_values.pop("D/total")
            entry.update({k: v for k, v in d_values.items() if k != "D/discriminator"})
        return entry, (source, driving, pncc_driving, outputs)


def train(options):
    """Run (or resume) training to ``options.steps`` -> the path of the last checkpoint.

    Under torchrun every rank calls this; rank 0 alone writes config.json, log.jsonl, samples,
    TensorBoard events and checkpoints."""
    trainer = Trainer(options)
    main = trainer.world.is_main
    run_dir = trainer.run_dir
    log_path = run_dir / "log.jsonl"
    if main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            output_folders.write_marker(run_dir, "train", "a rerun may continue this run (--resume)")
            trainer.config.to_json(run_dir / "config.json")
        except OSError as err:
            trainer.close()
            raise TrainingError(f"--out {run_dir}: cannot write there ({err.strerror or err})") from None
        if trainer.resumed_from is not None:
            _truncate_log(log_path, trainer.step)
        elif log_path.exists():
            log_path.unlink()
    if trainer.resumed_from is not None:
        log.info("rank %d resumed from %s at step %d", trainer.world.rank, trainer.resumed_from, trainer.step)
    sample_every = options.sample_every or options.checkpoint_every
    writer = _tensorboard(run_dir) if main else None
    bar = _progress(options.steps, trainer.step, options.progress and main)
    last = trainer.resumed_from
    try:
        with (open(log_path, "a") if main else contextlib.nullcontext()) as log_file:
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
                step = trainer.step
                if main:
                    log_file.write(json.dumps(entry) + "\n")
                    log_file.flush()
                    if writer is not None:
                        for key, value in entry.items():
                            if key not in ("step", "epoch"):
                                writer.add_scalar(key, value, step)
                    if step % sample_every == 0 or step == options.steps:
                        save_sample_grid(run_dir / "samples" / f"step-{step:08d}.png", *sample)
                        if writer is not None:
                            from ..model import preview_panels

                            panels = preview_panels(*sample[:3], sample[3])
                            writer.add_images("preview", panels[:8], step)
                if step % options.checkpoint_every == 0 or step == options.steps:
                    last = trainer.save()
                if bar is not None:
                    bar.set_postfix({name[0]: f"{entry[name]:.3f}" for name in ("G/total", "D/total") if name in entry},
                                    refresh=False)
                    bar.update(1)
        # Every rank leaves together. A rank that tore its process group down while rank 0 was
        # still writing the last checkpoint aborted at exit now and then ("terminate called
        # without an active exception", about 1 run in 15 under load).
        distributed.barrier(trainer.world)
    finally:
        trainer.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    return last
