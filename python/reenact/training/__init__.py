"""Training of the reenactment model, on one process or under ``torchrun``
(DDP), with exact resume.

One step is a generator step then a discriminator step (Adam for both)::

    batch -> P_s, P_d' (batch_pncc, on the training device) -> G(source, P_s, P_d')
          -> generator_loss -> G step -> discriminator_loss(output.detach()) -> D step

Run directory (``--out``):

- ``config.json``: the ReenactorConfig of the run;
- ``checkpoints/ckpt-<step>.safetensors``: one file per checkpoint, written atomically (temp file
  in the same directory, fsync, ``os.replace``). Its tensors are the weights of G and D
  (``G/...``, ``D/...``, the plain modules' names: no DDP ``module.`` or compile ``_orig_mod.``
  prefix), the flattened Adam states (``optim_G/state/<param>/<key>``) and the tensor parts of
  the RNG states (``rng/...`` for rank 0, ``rng/rank<r>/...`` for the other ranks); its
  safetensors metadata holds one small JSON document (key ``reenact_train``): step, data position
  (epoch and global batches consumed in it), the optimisers' param groups, the non-tensor RNG
  states, the config and the run options. The last ``--keep-last`` checkpoints are kept.
- ``log.jsonl``: one JSON object per step (step, epoch, losses averaged over the global batch, it/s);
- ``samples/step-<step>.png``: source | driving | P_d' | warped | output, one row per pair;
- ``tensorboard/``: the same scalars and sample grids, when TensorBoard is installed.

``--resume`` continues from the newest checkpoint exactly: same step, weights, optimiser state,
torch/numpy/python RNG states of every rank and data order. Checkpoints are only ever read with
safetensors; nothing here unpickles them.

Distributed runs (``torchrun --nproc_per_node N -m reenact train ...``):

- ``--batch-size`` is the *global* batch; each of the N ranks takes ``batch-size / N`` pairs
  (N must divide it). Global batch k of the epoch is the same set of pairs for any N, so the
  loss curve does not depend on N (up to floating-point summation order) and a run may resume
  with another N.
- Each rank reads its own shard of the epoch's schedule (``shard_id=rank``); DDP averages the
  gradients of G and of D, which equals the gradient of the global-batch mean loss.
- Every rank builds the models from ``--seed`` (identical weights), then reseeds its RNGs from
  (seed, rank), so random draws inside a step are independent between ranks. Checkpoints hold
  every rank's RNG states; a resume with the same N restores each rank's own, one with another N
  re-derives them from (seed, rank, step) and says so.
- Rank 0 owns every file: config, log, samples, TensorBoard, checkpoints and their pruning. A
  checkpoint is a collective step (the ranks send their RNG states to rank 0).
"""
from .checkpoints import (
    CHECKPOINT_DIR,
    CHECKPOINT_PATTERN,
    FORMAT_VERSION,
    METADATA_KEY,
    checkpoint_path,
    list_checkpoints,
    load_generator,
    prune_checkpoints,
    read_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from ..data.pncc import prepare_batch
from .distributed import World
from .errors import NonFiniteLoss, TrainingError
from .options import PRECISIONS, RESOLUTIONS, TrainOptions, build_config
from .run_files import save_sample_grid
from .stream import DataStream
from .trainer import Trainer, train

__all__ = [
    "CHECKPOINT_DIR", "CHECKPOINT_PATTERN", "FORMAT_VERSION", "METADATA_KEY", "PRECISIONS", "RESOLUTIONS",
    "DataStream", "NonFiniteLoss", "Trainer", "TrainOptions", "TrainingError", "World",
    "build_config", "checkpoint_path", "list_checkpoints", "load_generator",
    "prepare_batch", "prune_checkpoints", "read_checkpoint", "read_checkpoint_meta", "save_checkpoint",
    "save_sample_grid", "train",
]
