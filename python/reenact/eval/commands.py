"""The ``reenact eval`` subcommand."""
import dataclasses
import sys

from ..cli.arguments import add_detector, add_device, add_face_model, add_overwrite, add_quiet, require, subcommand
from ..cli.errors import reported
from .options import EvalError, EvalOptions
from .report import MODEL, repeat_warning
from .run import evaluate


def add_parser(subparsers):
    """Register ``eval``."""
    parser = subcommand(
        subparsers, "eval", run, help="self-reenactment metrics of a checkpoint (SSIM, PSNR, L1, pose/expression error)",
        description="For each clip, reenact its source frame with every other frame of the clip and compare "
                    "with the real frame. Writes eval.md and eval.json. Identity similarity and FID need "
                    "user-supplied weights (.safetensors or weights-only torch files; no code is loaded).")
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.safetensors)")
    parser.add_argument("--data", required=True, help="dataset directory (with manifest.jsonl), e.g. held-out clips")
    parser.add_argument("--out", help="output directory (default: eval-<checkpoint name> in the run directory)")
    parser.add_argument("--max-clips", type=int, default=0, help="evaluate only the first N clips (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per generator batch (default 8)")
    add_device(parser)
    parser.add_argument("--source-frame", type=int, default=0, help="the source frame of each clip (default 0)")
    add_detector(parser, choices=("mediapipe", "dlib", "none"),
                 help="landmark detector of the pose/expression re-fit (default mediapipe)")
    add_face_model(parser, default=None,
                   help="the face model the dataset was fitted with (default: the checkpoint's training model, "
                        "else the one the dataset's parameter files name)")
    parser.add_argument("--id-model", help="ArcFace IResNet weights (.safetensors or weights-only torch file)")
    parser.add_argument("--inception", help="torchvision Inception-v3 weights (.safetensors or weights-only torch file)")
    add_overwrite(parser, "eval")
    add_quiet(parser)



def run(args):
    """``reenact eval``: validate the options, evaluate, print one summary line."""
    # Checked before any work: checkpoints are safetensors, clips are decoded with PyAV. A missing
    # landmark detector only leaves the pose/expression rows "not computed".
    require("reenact eval", "safetensors", "av")
    names = [field.name for field in dataclasses.fields(EvalOptions) if field.name != "progress"]
    options = EvalOptions(**{name: getattr(args, name) for name in names}, progress=not args.quiet)
    with reported(EvalError, usage=True):
        options.validate()
    with reported(EvalError):
        results = evaluate(options)
    methods = {MODEL: results["metrics"], **results["baselines"]}
    summary = "; ".join(f"{name}: L1 {m['l1']['mean']:.4f}, PSNR {m['psnr']['mean']:.2f} dB, SSIM {m['ssim']['mean']:.4f}"
                        for name, m in methods.items())
    print(f"{results['pairs']} pairs of {results['clips']} clips: {summary}; wrote {options.out_dir()}")
    warning = repeat_warning(results)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
