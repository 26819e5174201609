"""The process group of a ``torchrun`` run and the few collectives the trainer needs.

``torchrun --nproc_per_node N -m reenact train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK in
every worker's environment; :meth:`World.from_env` reads them (a plain ``python -m reenact
train`` has none and is a world of one, with no process group and no collectives at all). Ranks
train on CUDA with NCCL, one device each (``cuda:LOCAL_RANK``), or on the CPU with gloo.
"""
import dataclasses
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .errors import TrainingError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its host."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self):
        return self.size > 1

    @property
    def is_main(self):
        """Rank 0 owns every file the run writes (checkpoints, log, samples, TensorBoard)."""
        return self.rank == 0

    @classmethod
    def from_env(cls, environ=None):
        environ = os.environ if environ is None else environ
        if "WORLD_SIZE" not in environ:
            return cls()
        values = {}
        for name in _ENV:
            try:
                values[name] = int(environ[name])
            except (KeyError, ValueError):
                raise TrainingError(f"torchrun environment: {name} must be an integer, got "
                                    f"{environ.get(name)!r} (start distributed runs with torchrun)") from None
        rank, size, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
        if size < 1 or not 0 <= rank < size or local < 0:
            raise TrainingError(f"torchrun environment: RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local} "
                                f"is not a valid process placement")
        return cls(rank, size, local)


def training_device(requested, world):
    """The torch.device this rank trains on. Under torchrun, ``requested`` may only name the kind
    ('cuda' or 'cpu'): rank r uses ``cuda:LOCAL_RANK``, which is also made the current device."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise TrainingError(f"--device {name!r}: {err}") from None
    if not world.distributed:
        return device
    if device.type not in ("cuda", "cpu") or device.index is not None:
        raise TrainingError(f"--device {name!r}: under torchrun pass 'cuda' or 'cpu'; each rank uses "
                            f"cuda:LOCAL_RANK (or the CPU)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if world.local_rank >= count:
            raise TrainingError(f"rank {world.rank} has LOCAL_RANK {world.local_rank}, but {count} CUDA "
                                f"device(s) are visible; start at most {count} processes per node")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def init_process_group(world, device):
    """Join the run's process group (NCCL on CUDA, gloo on the CPU) -> whether this call created
    it (and so must destroy it). A world of one has none."""
    if not world.distributed:
        return False
    if not dist.is_available():
        raise TrainingError("this torch build has no torch.distributed; torchrun runs need it")
    if dist.is_initialized():
        if dist.get_world_size() != world.size:
            raise TrainingError(f"a process group of {dist.get_world_size()} processes already exists, "
                                f"but WORLD_SIZE is {world.size}")
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise TrainingError("this torch build has no NCCL; run DDP on CUDA with an NCCL-enabled torch")
    dist.init_process_group(backend, rank=world.rank, world_size=world.size)
    return True


def barrier(world):
    """Wait until every rank gets here (nothing to wait for in a world of one)."""
    if world.distributed:
        dist.barrier()


def destroy_process_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(tensor, world):
    """The element-wise mean of ``tensor`` over all ranks (in place; itself in a world of one)."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world.size
    return tensor


def gather_objects(value, world):
    """[value of rank 0, value of rank 1, ...] on every rank (picklable values only)."""
    if not world.distributed:
        return [value]
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def wrap_ddp(module, device):
    """``module`` in DistributedDataParallel; its buffers (spectral-norm vectors) follow rank 0."""
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(module):
    """The plain module inside DDP and ``torch.compile`` wrappers (its state_dict has no
    ``module.`` or ``_orig_mod.`` prefixes)."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if inner is None and isinstance(module, torch.nn.parallel.DistributedDataParallel):
            inner = module.module
        if inner is None:
            return module
        module = inner
