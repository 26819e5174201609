"""Training checkpoints: one safetensors file per checkpoint, written atomically, read without
unpickling (see :mod:`reenact.training` for the layout).

Weights are saved from the plain modules, never from their DDP or ``torch.compile`` wrappers, so
the names carry no ``module.`` or ``_orig_mod.`` prefix and a checkpoint written by a torchrun
run loads in a single process (:func:`load_generator`); prefixes are stripped on reading anyway,
for files written by other tools. The RNG states of rank 0 are ``rng/...`` (the single-process
layout); rank r > 0 adds ``rng/rank<r>/...`` tensors and ``meta["rng_ranks"][str(r)]``.
"""
import json
import os
import pathlib
import random
import re

import numpy as np
import torch

from .distributed import unwrap
from .errors import TrainingError

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d{8})\.safetensors$")
METADATA_KEY = "reenact_train"
FORMAT_VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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


def rng_state():
    """This process's torch (CPU and CUDA), numpy and python RNG states -> (tensors, meta), with
    tensor names relative to ``rng/``."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{index}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss]}
    return tensors, meta


def _rng_prefix(rank):
    return "rng/" if rank == 0 else f"rng/rank{rank}/"


def saved_world_size(meta):
    """How many ranks' RNG states the checkpoint holds (1 for single-process checkpoints)."""
    return 1 + len(meta.get("rng_ranks", {}))


def restore_rng_state(tensors, meta, rank=0):
    """Set this process's RNGs to rank ``rank``'s states in a checkpoint."""
    prefix = _rng_prefix(rank)
    own = {name[len(prefix):]: value for name, value in tensors.items()
           if name.startswith(prefix) and not name[len(prefix):].startswith("rank")}
    meta = meta["rng"] if rank == 0 else meta["rng_ranks"][str(rank)]
    torch.set_rng_state(own["torch"])
    cuda = sorted((name for name in own if name.startswith("cuda/")), key=lambda n: int(n.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([own[name] for name in cuda])
    kind, pos, has_gauss, cached = meta["numpy"]
    keys = own["numpy_keys"].numpy().view(np.uint32)
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


def save_checkpoint(path, generator, discriminator, optimizer_g, optimizer_d, meta, rng_states=None):
    """Write one checkpoint file atomically (see :mod:`reenact.training` for its layout).

    ``generator`` and ``discriminator`` may be DDP or ``torch.compile`` wrappers: the plain
    modules' weights are saved. ``rng_states``: one :func:`rng_state` per rank, rank 0 first
    (default: this process's only).
    """
    from safetensors.torch import save

    tensors = {}
    for prefix, module in (("G", generator), ("D", discriminator)):
        for name, value in unwrap(module).state_dict().items():
            tensors[f"{prefix}/{name}"] = value
    meta = dict(meta)
    for prefix, optimizer in (("optim_G", optimizer_g), ("optim_D", optimizer_d)):
        flat, extra = _flatten_optimizer(optimizer, prefix)
        tensors.update(flat)
        meta[prefix] = extra
    for rank, (rng_tensors, rng_meta) in enumerate(rng_states or [rng_state()]):
        tensors.update({_rng_prefix(rank) + name: value for name, value in rng_tensors.items()})
        if rank == 0:
            meta["rng"] = rng_meta
        else:
            meta.setdefault("rng_ranks", {})[str(rank)] = rng_meta
    tensors = {name: value.detach().to("cpu").contiguous().clone() for name, value in tensors.items()}
    data = save(tensors, metadata={METADATA_KEY: json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, data)


def _open_checkpoint(path, tensor_prefix):
    """(tensors whose names start with ``tensor_prefix``, or None when it is None; meta)."""
    from safetensors import SafetensorError
    from safetensors import safe_open

    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        raise TrainingError(f"refusing to read {path}: checkpoints are .safetensors files")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = None if tensor_prefix is None else {
                name: handle.get_tensor(name) for name in handle.keys() if name.startswith(tensor_prefix)}
    except (SafetensorError, OSError) as err:
        raise TrainingError(f"cannot read checkpoint {path}: {err}") from None
    if METADATA_KEY not in metadata:
        raise TrainingError(f"{path} is not a reenact training checkpoint (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        raise TrainingError(f"{path}: its '{METADATA_KEY}' metadata is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise TrainingError(f"{path} has checkpoint format {version!r}; this version reads {FORMAT_VERSION}")
    return tensors, meta


def read_checkpoint(path):
    """(tensors, meta) of a checkpoint file, read with safetensors only (never unpickled)."""
    return _open_checkpoint(path, tensor_prefix="")


def read_checkpoint_meta(path):
    """The metadata of a checkpoint (step, config, options, data framing) without its tensors."""
    return _open_checkpoint(path, tensor_prefix=None)[1]


def _module_state(tensors, prefix):
    """The state dict of module ``prefix`` ("G" or "D"), without DDP/compile wrapper prefixes."""
    start = prefix + "/"
    state = {}
    for name, value in tensors.items():
        if name.startswith(start):
            name = name[len(start):]
            while name.startswith(_WRAPPER_PREFIXES):
                name = name.split(".", 1)[1]
            state[name] = value
    return state


def load_generator(path, device="cpu", ops=None):
    """The generator of a training checkpoint, in eval mode -> (Reenactor, ReenactorConfig).

    Reads only the generator's tensors (not D's or the optimisers'). Any file that is not a
    compatible checkpoint, weights that do not fit the recorded config included, raises
    TrainingError naming the problem."""
    from ..model import Reenactor, ReenactorConfig

    tensors, meta = _open_checkpoint(path, tensor_prefix="G/")
    try:
        config = ReenactorConfig.from_dict(meta["config"])
        generator = Reenactor(config.model)
        generator.load_state_dict(_module_state(tensors, "G"))
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(f"{path}: its weights do not fit its model config ({first})") from None
    if ops is not None:
        generator.set_ops(ops)
    return generator.to(device).eval(), config


def prune_checkpoints(run_dir, keep_last):
    """Delete all but the newest ``keep_last`` checkpoints."""
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        path.unlink()

