"""The trainer of ``reenact train``: one generator step then one discriminator step per batch,
on one process or on every rank of a ``torchrun`` run (see :mod:`reenact.training` for the run
directory, the checkpoint layout, the batch semantics and what rank 0 owns)."""
import contextlib
import json
import logging
import math
import pathlib
import random
import time

import numpy as np
import torch

from .. import output_folders, validation
from ..data.dataset import check_parameter_sizes
from ..data.framing import dataset_crop_scale
from ..data.loaders import make_loader
from ..data.pncc import prepare_batch
from ..face3d.loading import load_model
from ..model import Reenactor, ReenactmentLoss, ReenactorConfig, build_discriminator, get_ops, preview_panels
from ..progress import progress_bar
from . import distributed
from .checkpoints import (
    CHECKPOINT_DIR,
    FORMAT_VERSION,
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
from .options import build_config
from .precision import autocast_dtype, check_compile_available, compile_errors
from .run_files import save_sample_grid, tensorboard_writer, truncate_log
from .stream import DataStream

log = logging.getLogger("reenact.train")

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
        self.corr_cpu_path = self._pin_corr_cpu_path(meta)
        self.stream = DataStream(loader, epoch, position)
        self.generator_step_module = self._wrap(self.generator)
        self.discriminator_step_module = self._wrap(self.discriminator)

    def _wrap(self, module):
        if self.world.distributed:
            module = distributed.wrap_ddp(module, self.device)
        if self.options.compile:
            module = torch.compile(module)
        return module

    def _pin_corr_cpu_path(self, meta):
        """One corr_warp CPU path for the whole run -> its name (None off the CPU or without the op).

        corr_warp's CPU path (AVX-512 kernels, ATen's GEMMs or the bf16 kernels) is chosen by
        timing it once per process, and the paths differ in the last bits. A resumed run (or a
        noisy machine) could therefore choose another path than the run it continues, and its
        losses would part from the uninterrupted run's. So the run chooses once, from the model's
        widest warp, pins that path for every shape until `close`, and records it in each
        checkpoint; a resume pins the recorded path where this CPU has it (PNCC_CORR_SIMD wins)."""
        if self.device.type != "cpu" or self.config.model.ops != "fused":
            return None
        ops = torch.ops.pncc
        self._corr_path_before = ops._corr_cpu_path_mode("")
        recorded = (meta or {}).get("corr_cpu_path")
        if self._corr_path_before == "auto" and recorded in ("simd", "aten", "bf16"):
            try:
                ops._corr_cpu_path_mode(recorded)
                return recorded
            except RuntimeError as err:  # resumed on a CPU without that path
                log.warning("--resume: the run used corr_warp's %r CPU path, which this CPU lacks "
                            "(%s); the resumed losses differ from an uninterrupted run in the last bits",
                            recorded, validation.one_line(err))
        model = self.config.model
        chosen = ops._corr_cpu_path(model.correspondence_channels, model.appearance_channels[-1] + 8,
                                    self.autocast_dtype == torch.bfloat16)
        ops._corr_cpu_path_mode(chosen)
        return chosen

    def close(self):
        """Release the data stream and, when this trainer created it, the process group; unpin
        corr_warp's CPU path."""
        before = getattr(self, "_corr_path_before", None)
        if before is not None:
            torch.ops.pncc._corr_cpu_path_mode(before)
            self._corr_path_before = None
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.close()
        if self._owns_group:
            distributed.destroy_process_group()
            self._owns_group = False

    def _resumed_config(self, meta):
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
            "corr_cpu_path": self.corr_cpu_path,
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
        with compile_errors(self.options.compile):
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
            truncate_log(log_path, trainer.step)
        elif log_path.exists():
            log_path.unlink()
    if trainer.resumed_from is not None:
        log.info("rank %d resumed from %s at step %d", trainer.world.rank, trainer.resumed_from, trainer.step)
    sample_every = options.sample_every or options.checkpoint_every
    writer = tensorboard_writer(run_dir) if main else None
    bar = progress_bar(options.steps, "train", "step", options.progress and main, initial=trainer.step)
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
                            panels = preview_panels(*sample[:3], sample[3])
                            writer.add_images("preview", panels[:8], step)
                if step % options.checkpoint_every == 0 or step == options.steps:
                    last = trainer.save()
                bar.set_postfix({name[0]: f"{entry[name]:.3f}" for name in ("G/total", "D/total") if name in entry},
                                refresh=False)
                bar.update(1)
        # Every rank leaves together. A rank that tore its process group down while rank 0 was
        # still writing the last checkpoint aborted at exit now and then ("terminate called
        # without an active exception", about 1 run in 15 under load).
        distributed.barrier(trainer.world)
    finally:
        trainer.close()
        bar.close()
        if writer is not None:
            writer.close()
    return last
