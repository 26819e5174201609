"""``reenact prepare``: raw videos -> the prepared dataset (FORMAT.md).

Per raw video, in its own worker process (so a decoder that hangs or crashes in native code costs
that one file, never the run):

1. decode (PyAV) and find 68 landmarks per frame: a face3d detector (mediapipe by default) or
   landmarks read from files (``landmarks_from``; synthetic toy heads, or landmarks computed by
   another tool);
2. cut the frames with a face into runs, and long runs into clips of at most ``clip_length``;
3. per clip: a stable square crop box (landmark box centre and size, Gaussian-smoothed over time),
   landmarks mapped into the crop, and a face3d fit with one identity shared by the clip's frames
   (``fit_clip``: the identity from every 4th frame, then each frame with it; detected landmarks
   use the model and detector's calibration, see ``reenact.face3d.calibration``);
4. crop the frames kept from step 1 (or, when they exceed ``prepare_worker.FRAME_CACHE_BYTES``, decode again),
   resample to ``size`` x ``size`` and encode each clip (VP9 by default).

Workers write their native console output (mediapipe's TFLite/absl lines) to
``OUT_DIR/.prepare/native.log`` instead of the terminal.

The parent keeps ``workers`` such processes running, kills one that exceeds ``timeout`` seconds,
records every finished file under ``OUT_DIR/.prepare/`` (so a rerun resumes, skipping finished
files), rewrites ``manifest.jsonl`` and ends with a report of the skipped files and reasons. More
skips than ``max_skip_fraction`` of the files raise :class:`SkipBudgetExceeded` after the report.
"""
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.connection
from multiprocessing import forkserver
import os
import pathlib
import sys
import time

from .. import output_folders, validation
from ..validation import is_int
from ..face3d.loading import load_model
from . import format as fmt
from ..progress import progress_bar
from .dataset import SkipBudgetExceeded, check_skip_fraction
from .framing import CROP_SCALE_RANGE, crop_boxes, crop_frame, to_crop
from .merge import shard_of
from .prepare_worker import (  # noqa: F401 (NATIVE_LOG: public)
    NATIVE_LOG,
    STAGES,
    STATE_DIR,
    _worker,
    decode_for_prepare,
    process_file,
)
from .video import check_codec

log = logging.getLogger("reenact.data")

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".ogv", ".flv", ".ts"}
@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """Settings of one ``prepare`` run (all per-file work reads these)."""

    size: int = 256
    codec: str = "vp9"
    clip_length: int = 150
    min_clip_length: int = 8
    crop_scale: float = 1.7
    smooth_sigma: float = 2.0
    model: str = "toy"
    detector: str = "mediapipe"
    landmarks_from: str = None

    def check(self):
        check_codec(self.codec)
        if not (isinstance(self.size, int) and self.size >= 16 and self.size % 2 == 0):
            raise ValueError(f"size must be an even int >= 16, got {self.size!r}")
        if not (isinstance(self.min_clip_length, int) and 2 <= self.min_clip_length <= self.clip_length):
            raise ValueError(f"need integers 2 <= min_clip_length <= clip_length, got "
                             f"{self.min_clip_length!r}, {self.clip_length!r}")
        low, high = CROP_SCALE_RANGE
        if not low <= self.crop_scale <= high:
            raise ValueError(f"crop_scale must be in [{low:g}, {high:g}], got {self.crop_scale!r}")
        if not 0 <= self.smooth_sigma < 1000:
            raise ValueError(f"smooth_sigma must be in [0, 1000), got {self.smooth_sigma!r}")
        if self.landmarks_from is not None and not pathlib.Path(self.landmarks_from).is_dir():
            raise FileNotFoundError(f"landmarks_from must be a directory: {self.landmarks_from}")


@dataclasses.dataclass
class PrepareReport:
    files: int
    prepared: int
    resumed: int
    clips: int
    frames_in: int
    seconds: float
    skipped: list
    model: str = ""
    valid_fraction: dict = dataclasses.field(default_factory=dict)  # clip path -> fraction of valid frames
    #: CPU seconds of each stage (STAGES) over the files processed in this run, and their frames.
    stage_seconds: dict = dataclasses.field(default_factory=dict)
    stage_frames: int = 0

    def summary(self):
        rate = self.frames_in / self.seconds if self.seconds > 0 else 0.0
        lines = [f"prepared {self.prepared} of {self.files} file(s) ({self.resumed} already done), "
                 f"{self.clips} clip(s); {self.frames_in} input frames in {self.seconds:.1f} s ({rate:.1f} frames/s)"]
        if self.stage_frames and self.stage_seconds:
            split = ", ".join(f"{stage} {1000 * self.stage_seconds.get(stage, 0.0) / self.stage_frames:.1f}"
                              for stage in STAGES)
            total = 1000 * sum(self.stage_seconds.values()) / self.stage_frames
            lines.append(f"CPU ms per input frame: {split} (total {total:.1f}, over {self.stage_frames} frames)")
        if self.valid_fraction:
            fractions = sorted(self.valid_fraction.values())
            lines.append(f"valid frames per clip: median {fractions[len(fractions) // 2]:.0%}, lowest {fractions[0]:.0%} "
                         f"(face model {self.model})")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s):")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------------------

def find_videos(raw_dir):
    """Video files under raw_dir (recursive, sorted, hidden files and our sidecars excluded)."""
    raw_dir = pathlib.Path(os.fspath(raw_dir))
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw video directory not found: {raw_dir}")
    files = [p for p in raw_dir.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(raw_dir).parts)]
    return sorted(files, key=lambda p: str(p.relative_to(raw_dir)))


def _state_file(state_dir, relative, path):
    stat = path.stat()
    key = hashlib.sha1(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}".encode("utf-8")).hexdigest()
    return state_dir / f"{key}.json"


def _load_state(state, relative):
    """A finished file's state (``.prepare/<key>.json``), or None when it is missing or malformed
    (then the file is processed again, which rewrites it)."""
    try:
        done = validation.mapping(validation.read_json(state, "prepare state file"), f"prepare state file {state}")
        if done.get("status") == "ok":
            records = done.get("records")
            if not isinstance(records, list):
                raise validation.InputError(f"prepare state file {state}: records must be a list")
            for record in records:
                fmt.ClipRecord.from_json(json.dumps(record), where=f"prepare state file {state}")
        elif done.get("status") != "skip" or not isinstance(done.get("reason"), str):
            raise validation.InputError(f"prepare state file {state}: malformed status or reason")
    except FileNotFoundError:
        return None
    except (validation.InputError, fmt.DatasetError, TypeError) as err:
        log.warning("processing %s again: %s", relative, err)
        return None
    return done


def _unnamable(relative):
    """Why a raw file's name cannot be recorded in the manifest (JSON text is UTF-8), or None.
    (Long names are fine: clip files take a sanitised 40-character stem.)"""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return "its file name is not valid UTF-8 (rename the file)"
    return None


def claim_dataset(out_dir, overwrite=False):
    """Check that ``prepare`` may write into ``out_dir`` and mark it: a new or empty folder, or a
    dataset that ``prepare`` wrote (its marker, or the ``.prepare`` state folder of a dataset
    prepared before markers existed). A dataset another command wrote (``reenact synth``), or any
    other non-empty folder, is refused unless ``overwrite``: a rerun appends to or resumes its
    own dataset only."""
    legacy = (pathlib.Path(out_dir) / STATE_DIR).is_dir()
    try:
        output_folders.claim(out_dir, "prepare", "a rerun resumes this dataset and appends new videos to it",
                      flag="OUT_DIR", overwrite=overwrite or legacy)
    except output_folders.OutputFolderError as err:
        raise ValueError(str(err)) from None


def prepare(raw_dir, out_dir, options=PrepareOptions(), *, workers=1, timeout=1800.0, max_skip_fraction=0.2,
            retry_skipped=False, progress=True, decode=decode_for_prepare, overwrite=False,
            shard=(0, 1)):
    """Run ``prepare``; returns a :class:`PrepareReport` (also written to ``prepare_report.json``).

    ``decode`` (path -> iterator of RGB frames) is the decoding function the workers use; tests
    swap in decoders that hang or crash. ``shard`` (K, N): take only the videos of shard K of N
    (:func:`reenact.data.merge.shard_of`); ``reenact merge-datasets`` joins the shards' outputs.
    Raises SkipBudgetExceeded after writing the manifest and the report when too many files were
    skipped. ``out_dir`` must be new, empty or a dataset of ``prepare``'s (:func:`claim_dataset`);
    the clips it already lists stay listed.
    """
    options.check()
    if not is_int(workers) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    raw_dir, out_dir = pathlib.Path(os.fspath(raw_dir)), pathlib.Path(os.fspath(out_dir))
    index, count = shard
    videos = [v for v in find_videos(raw_dir) if shard_of(v.relative_to(raw_dir), count) == index]
    if out_dir.resolve() == raw_dir.resolve() or raw_dir.resolve() in out_dir.resolve().parents:
        raise ValueError(f"OUT_DIR must not be inside RAW_VIDEO_DIR ({out_dir} is in {raw_dir})")
    claim_dataset(out_dir, overwrite)
    # Clips listed by earlier runs (also of other raw folders) stay listed: a rerun appends.
    earlier = fmt.read_manifest(out_dir) if (out_dir / fmt.MANIFEST_NAME).is_file() else []
    state_dir = out_dir / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    pending, results, resumed = [], {}, 0
    for path in videos:
        relative = str(path.relative_to(raw_dir))
        unnamable = _unnamable(relative)
        if unnamable:
            shown = relative.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
            results[shown] = {"status": "skip", "reason": unnamable}
            continue
        state = _state_file(state_dir, relative, path)
        done = _load_state(state, relative)
        if done is not None and (done["status"] == "ok" or not retry_skipped):
            results[relative] = done
            resumed += 1
            continue
        pending.append((path, relative, state))

    model = load_model(options.model)
    bar = progress_bar(len(pending), "prepare", "file", progress)
    context = _worker_context()
    running = {}  # receiving end -> (process, relative, state, start)
    queue = list(pending)
    frames_in = 0
    stage_seconds, stage_frames = {}, 0
    appended = {record.clip for record in earlier}
    while queue or running:
        while queue and len(running) < workers:
            path, relative, state = queue.pop(0)
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_worker, args=(send, path, relative, out_dir, options, decode, model), daemon=True)
            process.start()
            send.close()  # the worker holds the only sending end: its death reads as EOF here
            running[receive] = (process, relative, state, time.monotonic())
        deadline = min(start + timeout for *_, start in running.values())
        ready = multiprocessing.connection.wait(list(running), timeout=max(0.0, deadline - time.monotonic()))
        now = time.monotonic()
        for receive in list(running):
            process, relative, state, start = running[receive]
            if receive in ready:
                done = _collect(process, receive)
            elif now - start >= timeout:
                process.kill()
                process.join()
                done = {"status": "skip", "reason": f"timed out after {timeout:g} s (decoder or fit hung); worker killed"}
            else:
                continue
            del running[receive]
            receive.close()
            frames_in += done.get("frames", 0)
            state.write_text(json.dumps(done, ensure_ascii=False), encoding="utf-8")
            results[relative] = done
            if done["status"] == "ok":
                stage_frames += done.get("frames", 0)
                for stage, seconds in (done.get("stages") or {}).items():
                    stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
                for record in done["records"]:
                    if record["clip"] not in appended:  # a clip listed once; the final manifest updates it
                        appended.add(record["clip"])
                        fmt.append_manifest(out_dir, fmt.ClipRecord(**record))
            else:
                log.warning("skipped %s: %s", relative, done["reason"])
            bar.update(1)
    bar.close()

    listed = {record.clip: record for record in earlier}
    listed.update((r["clip"], fmt.ClipRecord(**r)) for relative in sorted(results)
                  if results[relative]["status"] == "ok" for r in results[relative]["records"])
    records = [listed[clip] for clip in sorted(listed)]
    fmt.write_manifest(out_dir, records)
    skipped = [(relative, results[relative]["reason"]) for relative in sorted(results)
               if results[relative]["status"] != "ok"]
    valid_fraction = {record["clip"]: fraction for relative in sorted(results) if results[relative]["status"] == "ok"
                      for record, fraction in zip(results[relative]["records"],
                                                  results[relative].get("valid_fraction") or [])}
    report = PrepareReport(files=len(videos), prepared=len(videos) - len(skipped), resumed=resumed,
                           clips=len(records), frames_in=frames_in, seconds=time.perf_counter() - started,
                           skipped=skipped, model=model.name, valid_fraction=valid_fraction,
                           stage_seconds=stage_seconds, stage_frames=stage_frames)
    (out_dir / "prepare_report.json").write_text(json.dumps(dataclasses.asdict(report), ensure_ascii=False, indent=1),
                                                 encoding="utf-8")
    check_skip_fraction(skipped, len(videos), max_skip_fraction, what="files")
    return report


def _worker_context():
    """Workers start from a fork server: a clean single-threaded process that imported the heavy
    modules once. Forking this (possibly multi-threaded: DALI, DataLoader, OpenMP) process instead
    can deadlock the child on a lock some thread held at the fork; spawning imports torch per file.

    The server gets this process's ``sys.path`` through PYTHONPATH (Python 3.11's fork server does
    not apply the path it is handed), so it imports the same ``reenact`` and decode functions.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # mediapipe (with the matplotlib it imports) costs ~1 CPU second a file when a worker imports
    # it; a preload that fails to import is skipped by the fork server.
    context.set_forkserver_preload(["torch", "av", "reenact.face3d.fit", "reenact.face3d.detectors",
                                    "mediapipe.python.solutions.face_mesh",
                                    "mediapipe.python.solutions.face_detection",
                                    "reenact.data.prepare_worker"])
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        forkserver.ensure_running()
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous
    # Wait for the server's imports here, so that they never count against a file's timeout.
    warm_up = context.Process(target=os.getpid)
    warm_up.start()
    warm_up.join()
    return context


def _collect(process, receive):
    """The worker's message, or a skip naming how it died."""
    try:
        message = receive.recv()
    except (EOFError, OSError):
        message = None
    process.join(timeout=60)
    if process.is_alive():
        process.kill()
        process.join()
    if message is None:
        code = process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        return {"status": "skip", "reason": f"worker crashed ({how}) while decoding or fitting"}
    status, payload, frames, valid, stages = message
    if status == "ok":
        return {"status": "ok", "records": payload, "frames": frames, "valid_fraction": valid, "stages": stages}
    return {"status": "skip", "reason": payload}


__all__ = ["PrepareOptions", "PrepareReport", "prepare", "process_file", "find_videos", "crop_boxes",
           "to_crop", "crop_frame", "SkipBudgetExceeded", "VIDEO_SUFFIXES"]
