"""Training loaders: a DALI pipeline and a plain PyTorch fallback, with one interface.

Both yield, per step, a dict with
  - ``source``, ``driving``: (B, 3, H, W) float32 in [-1, 1] (channels first);
  - the parameters of :func:`reenact.data.pairs.batch_params` as tensors (alpha, pose_*, beta_*,
    landmarks_*, clip, frame_*, flip, pad).
For the same dataset, seed and epoch they give the same pairs with the same augmentation; the
pixels differ only by decoder rounding (PSNR > 40 dB, see tests/test_data_loaders.py).

``make_loader(..., backend="auto")`` takes DALI when it is installed and the clips' codec can be
decoded where the loader runs (VP9 on CPU; any NVDEC codec on GPU), and the fallback otherwise.
"""
import logging

import numpy as np
import torch

from .dataset import DALI_CPU_CODECS, ClipDataset
from .pairs import PairConfig, batch_params, epoch_schedule, normalisation, replacement
from .video import MediaError, keyframe_suffixes, read_frames

log = logging.getLogger("reenact.data")

_IMAGE_KEYS = ("source", "driving")
_PARAM_OUTPUTS = ("alpha", "pose_source", "pose_driving", "beta_source", "beta_driving",
                  "landmarks_source", "landmarks_driving", "clip", "frame_source", "frame_driving",
                  "flip", "pad")


class PairLoader:
    """Common part: the dataset, the schedule, epochs. Subclasses decode.

    Args:
        dataset: a :class:`ClipDataset` or a dataset directory.
        batch_size: pairs per step (per rank).
        seed: sampling seed; epoch: first epoch (``set_epoch`` changes it, as DistributedSampler).
        shard_id, num_shards: this rank and the world size (DDP); every rank runs ``len(self)`` steps.
        config: :class:`PairConfig` (gaps, flip, colour jitter).
        device: where the batches go ("cpu" or a CUDA device).
    """

    codecs = None

    def __init__(self, dataset, batch_size=32, seed=0, epoch=0, shard_id=0, num_shards=1,
                 config=PairConfig(), device="cpu", max_skip_fraction=0.1):
        if not isinstance(dataset, ClipDataset):
            dataset = ClipDataset(dataset, codecs=self.codecs, max_skip_fraction=max_skip_fraction)
        self.dataset = dataset
        self.batch_size, self.seed, self.epoch, self.skip = batch_size, seed, epoch, 0
        self.shard_id, self.num_shards, self.config = shard_id, num_shards, config
        self.device = torch.device(device)
        epoch_schedule(dataset.frame_counts, batch_size, seed, 0, shard_id, num_shards, config,
                       dataset.valid_frames)  # validates

    def set_epoch(self, epoch, skip=0):
        """Take epoch ``epoch``'s batches, less its first ``skip`` ones (a resumed epoch's consumed batches)."""
        self.epoch, self.skip = int(epoch), int(skip)

    def schedule(self):
        """This rank's batches of the epoch, in order: lists of PairSpecs (the first ``skip`` left out)."""
        return epoch_schedule(self.dataset.frame_counts, self.batch_size, self.seed, self.epoch,
                              self.shard_id, self.num_shards, self.config, self.dataset.valid_frames)[self.skip:]

    def __len__(self):
        per_step = self.batch_size * self.num_shards
        return -(-len(self.dataset) // per_step)


# -- fallback: PyTorch DataLoader over PyAV ---------------------------------------------------------

class _PairSamples(torch.utils.data.Dataset):
    """Map-style dataset over one epoch's PairSpecs; decodes with PyAV in the DataLoader workers."""

    def __init__(self, dataset, specs):
        self.dataset, self.specs = dataset, specs

    def __len__(self):
        return len(self.specs)

    def __getitem__(self, item):
        spec = self.specs[item]
        clips = self.dataset.clips
        for _ in range(len(clips)):
            try:
                frames = read_frames(clips[spec.clip].video, [spec.source, spec.driving],
                                     self.dataset.frame_index(spec.clip))
                break
            except (MediaError, OSError) as err:
                spec = _replace_broken(self.dataset, spec, err)
        else:
            raise MediaError(f"no clip of {self.dataset.root} decodes")
        # numpy, not torch: per-sample maths on small arrays gains nothing from intra-op threads,
        # which only contend with the decoding (and with DataLoader workers).
        images = np.stack(frames)  # (2, H, W, 3) uint8
        if spec.flip:
            images = images[:, :, ::-1]
        mean, std = normalisation(spec)
        images = np.clip((images.astype(np.float32) - mean) / std, -1.0, 1.0)
        images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        params = {key: torch.as_tensor(value[0]) for key, value in batch_params(clips, [spec]).items()}
        return dict(params, source=images[0], driving=images[1])


def _replace_broken(dataset, spec, err):
    """Log a clip that broke after verification and return the pair that replaces it, so the
    batch keeps its size (see :func:`reenact.data.pairs.replacement`)."""
    log.warning("skipping broken clip %s: %s", dataset.clips[spec.clip].record.clip, err)
    return replacement(spec, dataset.frame_counts, dataset.valid_frames)


class FallbackLoader(PairLoader):
    """A plain PyTorch DataLoader with PyAV decoding (any codec PyAV decodes).

    ``num_workers`` DataLoader worker processes decode; with a CUDA ``device`` batches are
    pinned and copied asynchronously.
    """

    def __init__(self, dataset, batch_size=32, num_workers=0, **kwargs):
        super().__init__(dataset, batch_size, **kwargs)
        self.num_workers = num_workers

    def __iter__(self):
        specs = [spec for batch in self.schedule() for spec in batch]
        pin = self.device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            _PairSamples(self.dataset, specs), batch_size=self.batch_size, shuffle=False,
            num_workers=self.num_workers, pin_memory=pin)
        for batch in loader:
            yield {key: value.to(self.device, non_blocking=pin) for key, value in batch.items()}


# -- DALI ---------------------------------------------------------------------------------------------

def _dali():
    try:
        import nvidia.dali as dali  # optional dependency (nvidia-dali)
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as err:
        raise ImportError("the DALI loader needs `pip install nvidia-dali-cuda130==2.4.0`; "
                          "use backend='fallback' without it") from err
    return dali, DALIGenericIterator


class _Feed:
    """The external source of the DALI pipeline: one batch of encoded clips, frame indices,
    augmentation and parameters per call, in schedule order."""

    def __init__(self, loader):
        self.loader = loader
        self.batches = None

    def __iter__(self):
        # DALI re-iterates the source as soon as an epoch ends, before set_epoch() can run, so
        # the schedule is built lazily, at the first batch the pipeline asks for.
        self.batches = None
        return self

    def __next__(self):
        if self.batches is None:
            self.batches = iter(self.loader.schedule())
        specs = next(self.batches)
        dataset = self.loader.dataset
        streams = {"source": ([], []), "driving": ([], [])}
        for position, spec in enumerate(specs):
            for _ in range(len(dataset)):
                try:
                    pair = [self.loader.encoded(spec.clip, frame) for frame in (spec.source, spec.driving)]
                    break
                except (MediaError, OSError) as err:
                    spec = specs[position] = _replace_broken(dataset, spec, err)
            else:
                raise MediaError(f"no clip of {dataset.root} decodes")
            for role, (encoded, offset) in zip(("source", "driving"), pair):
                streams[role][0].append(encoded)
                streams[role][1].append(np.array([offset], dtype=np.int32))
        mirror = [np.array(int(spec.flip), dtype=np.int32) for spec in specs]
        norms = [normalisation(spec) for spec in specs]
        params = batch_params(dataset.clips, specs)
        return (*streams["source"], *streams["driving"], mirror, [m for m, _ in norms], [s for _, s in norms],
                *[params[key] for key in _PARAM_OUTPUTS])


class DaliLoader(PairLoader):
    """The DALI pipeline: ``fn.decoders.video`` with frame indices from an external source.

    The external source gives, per sample, the source and driving frames as (stream, index):
    the clip re-muxed from the key frame before the frame (see :meth:`encoded`), decoded by one
    ``fn.decoders.video`` per role, then concatenated, flipped and normalised by
    ``crop_mirror_normalize`` (per-sample mirror, mean and std from the shared sampler) and
    clamped. The parameters travel through the same external source, so they cannot drift from
    their frames.

    On CPU (``device="cpu"``, ``device_id=None``) the clips must be VP8/VP9/MJPEG; on a CUDA
    device decoding runs on NVDEC (``device="mixed"``), flips and normalisation on the GPU, and
    the parameters are copied to the GPU by DALI. ``num_threads`` DALI worker threads.
    """

    def __init__(self, dataset, batch_size=32, num_threads=2, prefetch=2, **kwargs):
        device = torch.device(kwargs.get("device", "cpu"))
        self.codecs = DALI_CPU_CODECS if device.type == "cpu" else None
        super().__init__(dataset, batch_size, **kwargs)
        if self.codecs is not None:
            others = sorted({c.codec for c in self.dataset.clips} - set(self.codecs))
            if others:
                raise ValueError(f"DALI cannot decode {', '.join(others)} on the CPU (only {', '.join(self.codecs)}); "
                                 f"use device='cuda' or the fallback loader")
        dali, self._iterator_class = _dali()
        self._suffixes = {}
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        fn, types = dali.fn, dali.types
        pipe = dali.Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                             prefetch_queue_depth=prefetch, seed=int(self.seed) % (2 ** 31), exec_dynamic=True)
        with pipe:
            outputs = fn.external_source(source=_Feed(self), num_outputs=7 + len(_PARAM_OUTPUTS),
                                         batch=True, cycle="raise")
            source, source_frame, driving, driving_frame, mirror, mean, std = outputs[:7]
            decoder = "mixed" if gpu else "cpu"
            # One decoder per role: each reads a stream that starts at its frame's key frame.
            video = fn.cat(fn.decoders.video(source, frames=source_frame, device=decoder),
                           fn.decoders.video(driving, frames=driving_frame, device=decoder), axis=0)
            video = fn.crop_mirror_normalize(video, mirror=mirror, mean=mean, std=std,
                                             dtype=types.FLOAT, output_layout="FCHW")
            video = dali.math.clamp(video, -1.0, 1.0)
            params = [p.gpu() if gpu else p for p in outputs[7:]]
            pipe.set_outputs(video, *params)
        self.pipe = pipe
        self._iterator, self._finished = None, False

    def encoded(self, clip_id, frame):
        """(stream, index in it) for a frame: the clip re-muxed from the key frame before the frame
        (:func:`~reenact.data.video.keyframe_suffixes`), built once per clip and kept: clips are
        small. DALI 2.4's CPU decoder decodes a stream forward from its start, so feeding it the
        whole clip would decode every frame before the wanted one."""
        if clip_id not in self._suffixes:
            self._suffixes[clip_id] = keyframe_suffixes(self.dataset.clips[clip_id].video)
        suffixes, keyframe_before = self._suffixes[clip_id]
        key = int(keyframe_before[frame])
        return suffixes[key], frame - key

    def __iter__(self):
        # No auto_reset: DALI would then prefetch the next epoch before set_epoch() is called.
        # The feed is re-iterated (new schedule) when the pipeline is built and on each reset.
        if self._iterator is None or not self._finished:
            if self._iterator is not None:
                self.pipe.reset()
            self._iterator = self._iterator_class(self.pipe, ["video", *_PARAM_OUTPUTS])
        else:
            self._iterator.reset()
        self._finished = False
        for (batch,) in self._iterator:
            video = batch.pop("video")
            batch = {key: value.to(self.device) for key, value in batch.items()}
            batch["source"], batch["driving"] = video[:, 0], video[:, 1]
            batch["flip"] = batch["flip"].bool()
            batch["pad"] = batch["pad"].bool()
            yield batch
        self._finished = True


def dali_available():
    try:
        _dali()
    except ImportError:
        return False
    return True


def make_loader(dataset, backend="auto", **kwargs):
    """A DaliLoader or FallbackLoader. ``backend``: "dali", "fallback" or "auto" (DALI when
    installed and every clip's codec decodes there, else the fallback)."""
    if backend not in ("auto", "dali", "fallback"):
        raise ValueError(f"backend must be 'auto', 'dali' or 'fallback', got {backend!r}")
    dali_kwargs = {k: v for k, v in kwargs.items() if k != "num_workers"}
    fallback_kwargs = {k: v for k, v in kwargs.items() if k not in ("num_threads", "prefetch")}
    if backend == "fallback":
        return FallbackLoader(dataset, **fallback_kwargs)
    if backend == "dali":
        return DaliLoader(dataset, **dali_kwargs)
    if not dali_available():
        log.info("DALI is not installed; using the PyTorch fallback loader")
        return FallbackLoader(dataset, **fallback_kwargs)
    opened = dataset if isinstance(dataset, ClipDataset) else ClipDataset(
        dataset, max_skip_fraction=kwargs.get("max_skip_fraction", 0.1))
    if torch.device(kwargs.get("device", "cpu")).type == "cpu" and any(c.codec not in DALI_CPU_CODECS for c in opened.clips):
        log.info("some clips are not VP8/VP9/MJPEG, which DALI cannot decode on the CPU; using the fallback loader")
        return FallbackLoader(opened, **fallback_kwargs)
    return DaliLoader(opened, **dali_kwargs)
