"""The ``reenact demo`` subcommand."""
import dataclasses

from ..cli.arguments import add_quiet, directory, require, subcommand
from ..cli.errors import UsageError, reported
from ..training.errors import TrainingError
from .stages import DemoError, DemoRecipe, run_demo


#: Modules the demo needs (import names); tensorboard, tqdm and matplotlib are optional (the demo
#: runs without them).
REQUIRED_MODULES = ("safetensors", "av", "PIL")


def add_parser(subparsers):
    """Register ``demo``."""
    parser = subcommand(
        subparsers, "demo", run, help="offline demo: animate a real portrait (no training), then synthesise toy-head data, "
                     "train briefly and reenact a held-out identity",
        description="Animate the astronaut portrait with the built-in mediapipe face model in the "
                    "training-free geometric mode (OUT/real_face.mp4, OUT/real_face_grid.png); then generate a synthetic toy-head dataset, train the small model on the CPU for a few "
                    "minutes, reenact a held-out identity with a held-out driving clip, and write "
                    "OUT/result.mp4, OUT/grid.png and OUT/loss.png (all synthetic).")
    parser.add_argument("--out", default="demo", help="output directory (default: demo)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help=f"training steps (default {DemoRecipe.steps}: about 2.5 minutes "
                                                  f"in all on one idle CPU core)")
    budget.add_argument("--minutes", type=float, help="train for about this long instead (step count from the "
                                                      "measured speed; less repeatable than --steps)")
    parser.add_argument("--clips", type=int, help=f"training clips (default {DemoRecipe.clips})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the training (default 0)")
    parser.add_argument("--no-real-face", action="store_true", help="skip the real-face stage")
    add_quiet(parser, help="no stage messages or progress bars")



def run(args):
    """``reenact demo``: check the options and the packages, then run every stage."""
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.minutes is not None and not args.minutes > 0:
        raise UsageError(f"--minutes must be > 0, got {args.minutes}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.clips is not None and args.clips < 1:
        raise UsageError(f"--clips must be >= 1, got {args.clips}")
    # Checked before any work: the first checkpoint comes minutes into training.
    require("the demo", *REQUIRED_MODULES, alternative=" (or the whole extra: `pip install 'pncc-cuda[reenact]'`)")
    out = directory(args.out, "--out", error=UsageError)
    recipe = DemoRecipe()
    if args.clips is not None:
        recipe = dataclasses.replace(recipe, clips=args.clips)
    with reported(TrainingError, DemoError):
        result = run_demo(out, recipe=recipe, steps=args.steps, minutes=args.minutes, seed=args.seed,
                          quiet=args.quiet, real_face=not args.no_real_face)
    if "real_grid" in result:
        print(f"demo: real face (no training): wrote {result['real_video']} and {result['real_grid']}")
    print(f"demo: trained {result['steps']} steps; wrote {result['video']} and {result['grid']} "
          f"[synthetic toy heads]")
    return 0
