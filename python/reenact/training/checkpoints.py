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

from .. import validation
from ..data.framing import CROP_SCALE_RANGE
from ..model import Reenactor, ReenactorConfig
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
    from safetensors.torch import save  # optional dependency (safetensors)

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
    """(tensors whose names start with ``tensor_prefix``, or None when it is None; meta).

    The safetensors header is checked against the file size, and the metadata's types and ranges
    (:func:`check_meta`), before any tensor is read; floating-point tensors must be finite."""
    from safetensors import SafetensorError, safe_open  # optional dependency, as above

    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        raise TrainingError(f"refusing to read {path}: checkpoints are .safetensors files")
    try:
        _, metadata = validation.check_safetensors(path, "checkpoint")
        if METADATA_KEY not in metadata:
            raise TrainingError(f"{path} is not a reenact training checkpoint (no '{METADATA_KEY}' metadata)")
        meta = validation.parse_json(metadata[METADATA_KEY], f"{path}: its '{METADATA_KEY}' metadata")
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise TrainingError(f"{path} has checkpoint format {version!r}; this version reads {FORMAT_VERSION}")
        check_meta(meta, path)
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = None if tensor_prefix is None else {
                name: handle.get_tensor(name) for name in handle.keys() if name.startswith(tensor_prefix)}
        if tensors is not None:
            validation.check_finite(tensors, f"checkpoint {path}")
    except validation.InputError as err:
        raise TrainingError(str(err)) from None
    except (SafetensorError, OSError) as err:
        raise TrainingError(f"cannot read checkpoint {path}: {validation.one_line(err)}") from None
    return tensors, meta


#: Largest step, epoch and data position a checkpoint may record.
MAX_STEP = 10 ** 9


def check_meta(meta, path):
    """Types and ranges of the metadata fields that readers use -> InputError naming the field.

    The training-only parts (optimiser and RNG states) are checked when present, so a malformed
    one fails here and not inside torch or numpy on ``--resume``."""
    where = f"checkpoint {path}"
    validation.integer(meta.get("step"), f"{where}: step", 0, MAX_STEP)
    validation.mapping(meta.get("config"), f"{where}: config")
    for key in ("options", "data"):  # optional (files of other writers); a JSON object when present
        validation.mapping(meta.setdefault(key, {}), f"{where}: {key}")
    try:
        ReenactorConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise validation.InputError(f"{where}: config: {validation.one_line(err)}") from None
    options, data = meta["options"], meta["data"]
    if "face_model" in options:
        validation.string(options["face_model"], f"{where}: options.face_model")
    for key, low, high in (("batch_size", 1, 10 ** 6), ("seed", 0, 2 ** 63), ("world_size", 1, 2 ** 16)):
        if key in options:
            validation.integer(options[key], f"{where}: options.{key}", low, high)
    for key in ("epoch", "position"):
        if key in data:
            validation.integer(data[key], f"{where}: data.{key}", 0, MAX_STEP * 10 ** 6)
    if data.get("crop_scale") is not None:
        validation.number(data["crop_scale"], f"{where}: data.crop_scale", *CROP_SCALE_RANGE)
    for prefix in ("optim_G", "optim_D"):
        if prefix in meta:
            _check_optimizer_meta(meta[prefix], f"{where}: {prefix}")
    if "rng" in meta:
        _check_rng_meta(meta["rng"], f"{where}: rng")
    for rank, entry in validation.mapping(meta.get("rng_ranks", {}), f"{where}: rng_ranks").items():
        validation.integer(int(rank) if rank.isdigit() else rank, f"{where}: rng_ranks key", 1, 2 ** 16)
        _check_rng_meta(entry, f"{where}: rng_ranks.{rank}")


def _check_optimizer_meta(entry, where):
    validation.mapping(entry, where)
    groups = entry.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(group, dict) for group in groups):
        raise validation.InputError(f"{where}.param_groups must be a list of JSON objects")
    for group in groups:
        for key in ("lr", "eps", "weight_decay"):
            if key in group:
                validation.number(group[key], f"{where}.param_groups.{key}", 0, 1e6)
        if not isinstance(group.get("params"), list) or not all(
                validation.is_int(i) and 0 <= i < 10 ** 6 for i in group["params"]):
            raise validation.InputError(f"{where}.param_groups.params must be a list of parameter indices")
    extra = validation.mapping(entry.get("state_extra"), f"{where}.state_extra")
    for name in extra:
        index, _, key = name.partition("/")
        if not index.isdigit() or not key:
            raise validation.InputError(f"{where}.state_extra has a malformed entry {name[:60]!r}")


def _check_rng_meta(entry, where):
    validation.mapping(entry, where)
    numpy_state, python_state = entry.get("numpy"), entry.get("python")
    if not (isinstance(numpy_state, list) and len(numpy_state) == 4 and numpy_state[0] == "MT19937"):
        raise validation.InputError(f"{where}.numpy must be [\"MT19937\", position, has_gauss, cached]")
    validation.integer(numpy_state[1], f"{where}.numpy position", 0, 624)
    validation.integer(numpy_state[2], f"{where}.numpy has_gauss", 0, 1)
    validation.number(numpy_state[3], f"{where}.numpy cached gaussian")
    if not (isinstance(python_state, list) and len(python_state) == 3 and isinstance(python_state[1], list)
            and len(python_state[1]) == 625
            and all(validation.is_int(v) and 0 <= v < 2 ** 32 for v in python_state[1])):
        raise validation.InputError(f"{where}.python must be [version, 625 state words, gauss]")
    validation.integer(python_state[0], f"{where}.python version", 1, 3)
    if python_state[2] is not None:
        validation.number(python_state[2], f"{where}.python gauss")


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

