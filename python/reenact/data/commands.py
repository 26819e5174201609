"""The data subcommands of ``reenact``: ``synth``, ``prepare`` and ``merge-datasets``."""
import contextlib
import pathlib

from .. import output_folders
from ..cli.errors import CommandError, reported
from ..progress import progress_bar
from ..cli.arguments import add_detector, add_overwrite, add_quiet, detector_module, directory, missing, require, subcommand
from .dataset import SkipBudgetExceeded
from .format import dataset_face_model
from .merge import merge_datasets, parse_shard
from .prepare import PrepareOptions, prepare
from .synth import synth_dataset


def add_synth_parser(subparsers):
    parser = subcommand(
        subparsers, "synth", run, help="render a synthetic toy-head dataset with ground-truth parameters",
        description="Render clips of the built-in synthetic toy head (random identities, expression "
                    "trajectories and head motion) in the prepared-dataset format, with exact parameters.")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output directory (created if needed)")
    parser.add_argument("--clips", type=int, required=True, help="number of clips")
    parser.add_argument("--frames", type=int, default=32, help="frames per clip (default 32)")
    parser.add_argument("--size", type=int, default=256, help="clip height and width in pixels (default 256)")
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--codec", default="vp9", choices=["vp9", "h264"])
    parser.add_argument("--identities", type=int, default=None,
                        help="distinct identities, shared round-robin by the clips (default: one per clip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true",
                        help="write uncropped raw videos plus <name>.landmarks.npy (input for `reenact prepare`)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset's manifest")
    add_quiet(parser)


def add_prepare_parser(subparsers):
    parser = subcommand(
        subparsers, "prepare", run, help="turn raw videos into a training dataset (face crops, fitted parameters)",
        description="Detect and track the face, crop it stably, fit the morphable model (one identity "
                    "per clip), encode 256x256 clips and write manifest.jsonl. Resumable; broken files "
                    "are skipped and reported.")
    parser.add_argument("raw_dir", metavar="RAW_VIDEO_DIR", help="directory of input videos (searched recursively)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="dataset directory (created; reruns resume)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per file before its worker is killed")
    parser.add_argument("--max-skip-fraction", type=float, default=0.2,
                        help="fail (exit 1) when more than this fraction of files is skipped (default 0.2)")
    parser.add_argument("--retry-skipped", action="store_true", help="retry files a previous run skipped")
    parser.add_argument("--size", type=int, default=256, help="crop size in pixels (default 256)")
    parser.add_argument("--codec", default="vp9", choices=["vp9", "h264"],
                        help="vp9 (default; DALI decodes it on CPU and GPU) or h264 (GPU-only training)")
    parser.add_argument("--clip-length", type=int, default=150, help="longest clip in frames; longer runs are split")
    parser.add_argument("--min-clip-length", type=int, default=8, help="shorter face runs are dropped")
    parser.add_argument("--crop-scale", type=float, default=1.7, help="crop side over the landmark box side")
    parser.add_argument("--smooth", type=float, default=2.0, help="crop smoothing (Gaussian sigma in frames)")
    parser.add_argument("--model", default=None,
                        help="'mediapipe' (built in, licence-free; the default for real videos), 'toy' (the "
                             "default with --landmarks-from or --detector dlib, and for synthetic data), a model "
                             ".npz, or 3DDFA_V2's bfm .pkl; a rerun keeps the model of the clips it resumes")
    add_detector(parser)
    parser.add_argument("--landmarks-from", metavar="DIR",
                        help="read landmarks instead of detecting: DIR/<video name>.landmarks.npy (or .npy/.npz/.txt), "
                             "as written by `reenact synth --raw`")
    add_overwrite(parser, "prepare", "OUT_DIR", " (e.g. a `reenact synth` dataset; its manifest is replaced)")
    parser.add_argument("--shard", default="0/1", metavar="K/N",
                        help="take only shard K (0-based) of N of the input videos, split by a hash of each path, "
                             "so N machines can run at once (e.g. --shard $SLURM_ARRAY_TASK_ID/N); join the "
                             "outputs with `reenact merge-datasets`")
    add_quiet(parser)


def add_merge_parser(subparsers):
    parser = subcommand(
        subparsers, "merge-datasets", run, help="join the outputs of sharded `prepare` runs into one dataset",
        description="Hard-link (or copy) the clips of prepared shard datasets into OUT_DIR and write one "
                    "manifest and report; refuses duplicate sources or clip names, mixed crop sizes or "
                    "face models. The shards are left unchanged.")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="new dataset directory")
    parser.add_argument("shard_dirs", metavar="SHARD_DIR", nargs="+", help="prepared shard datasets")
    parser.add_argument("--copy", action="store_true", help="copy files instead of hard-linking them")


def add_parser(subparsers):
    """Register ``synth``, ``prepare`` and ``merge-datasets``."""
    add_synth_parser(subparsers)
    add_prepare_parser(subparsers)
    add_merge_parser(subparsers)


def run_synth(args):
    """``reenact synth OUT_DIR --clips N``: a synthetic toy-head dataset (or raw videos with --raw)."""
    require("reenact synth", "av")  # before any work: each clip is rendered, then encoded with PyAV
    out_dir = directory(args.out_dir, "OUT_DIR")
    if not args.raw and (out_dir / "manifest.jsonl").exists() and not args.overwrite:
        raise CommandError(f"{out_dir} already holds a dataset (manifest.jsonl); pass --overwrite to replace it")
    with reported(output_folders.OutputFolderError):
        output_folders.claim(out_dir, "synth", "a rerun with --overwrite replaces the clips here", flag="OUT_DIR",
                             overwrite=args.overwrite)
    bar = progress_bar(args.clips, "synth", "clip", not args.quiet)
    with reported(ValueError, ImportError, OSError), contextlib.closing(bar):
        results = synth_dataset(out_dir, args.clips, frames=args.frames, size=args.size, fps=args.fps,
                                codec=args.codec, identities=args.identities, seed=args.seed, raw=args.raw,
                                progress=bar.update)
    what = "raw videos with .landmarks.npy" if args.raw else "clips"
    print(f"wrote {len(results)} synthetic toy-head {what} ({args.frames} frames, {args.size}px, "
          f"{args.codec}) to {out_dir} [synthetic model]")
    return 0


def default_prepare_model(args):
    """``--model``, else the face model of the dataset being resumed, else the built-in ``mediapipe``
    model for real videos (faces found by the mediapipe detector) and the toy head where the
    landmarks are given (``--landmarks-from``: ``reenact synth --raw``'s toy-head videos) or come
    from dlib (68 points, no dense mesh to fit the mediapipe model to)."""
    if args.model is not None:
        return args.model
    resumed = dataset_face_model(args.out_dir)  # a rerun resumes with the model of the finished clips
    if resumed is not None:
        return resumed
    return "mediapipe" if args.landmarks_from is None and args.detector == "mediapipe" else "toy"


def run_prepare(args):
    """``reenact prepare RAW_VIDEO_DIR OUT_DIR``."""
    options = PrepareOptions(size=args.size, codec=args.codec, clip_length=args.clip_length,
                             min_clip_length=args.min_clip_length, crop_scale=args.crop_scale,
                             smooth_sigma=args.smooth, model=default_prepare_model(args), detector=args.detector,
                             landmarks_from=args.landmarks_from)
    require("reenact prepare", "av")  # every clip is decoded and encoded with PyAV
    # Checked without creating a detector: mediapipe objects must not exist before the fork.
    if options.landmarks_from is None and missing(detector_module(options.detector)):
        raise CommandError(f"the {options.detector} detector is not installed (`pip install "
                           f"{missing(detector_module(options.detector))[0]}`), or pass --landmarks-from DIR")
    try:
        report = prepare(args.raw_dir, args.out_dir, options, workers=args.workers, timeout=args.timeout,
                         max_skip_fraction=args.max_skip_fraction, retry_skipped=args.retry_skipped,
                         progress=not args.quiet, overwrite=args.overwrite,
                         shard=parse_shard(args.shard))
    except SkipBudgetExceeded as err:
        report_path = pathlib.Path(args.out_dir) / "prepare_report.json"
        raise CommandError(f"{err} (the manifest of the good files and {report_path} were written)") from None
    except (ValueError, FileNotFoundError, ImportError, OSError) as err:
        raise CommandError(str(err)) from None  # after SkipBudgetExceeded, a ValueError with more to say
    print(report.summary())
    return 0


def run_merge(args):
    """``reenact merge-datasets OUT_DIR SHARD_DIR...``."""
    with reported(ValueError, FileNotFoundError, OSError):
        merged = merge_datasets(args.out_dir, args.shard_dirs, copy=args.copy)
    print(f"merged {len(merged)} clip(s) from {len(args.shard_dirs)} shard(s) into {args.out_dir}")
    return 0


def run(args):
    """Run the data subcommand that ``args`` names."""
    return {"synth": run_synth, "prepare": run_prepare, "merge-datasets": run_merge}[args.command](args)
