"""The ``reenact train`` subcommand: argument parsing and one-line error reporting."""
from ..cli.errors import CommandError, reported
from ..cli.arguments import add_device, add_face_model, add_overwrite, add_quiet, require, subcommand
from .distributed import World
from .errors import TrainingError
from .options import PRECISIONS, RESOLUTIONS, TrainOptions
from .trainer import train


def add_parser(subparsers):
    """Register ``train``."""
    parser = subcommand(
        subparsers, "train", run, help="train the reenactment model (one process or torchrun DDP; --resume continues exactly)",
        description="Train the generator and discriminator on a prepared dataset (`reenact prepare` or "
                    "`reenact synth`). Writes safetensors checkpoints, log.jsonl, sample grids and TensorBoard "
                    "events to --out. Multi-process: `torchrun --nproc_per_node N -m reenact train ...` "
                    "(DDP; NCCL on GPUs, gloo on the CPU; each rank reads its own shard of the data and "
                    "rank 0 writes all files).")
    parser.add_argument("--data", required=True, help="dataset directory (with manifest.jsonl)")
    parser.add_argument("--out", required=True, help="run directory (created if needed)")
    parser.add_argument("--config", help="ReenactorConfig JSON file (default: the small preset)")
    parser.add_argument("--steps", type=int, default=1000, help="train until this step (default 1000)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="global batch: pairs per step summed over all processes; under torchrun each "
                             "rank takes batch-size / world size, which must divide evenly (default 8)")
    parser.add_argument("--resolution", type=int, choices=RESOLUTIONS,
                        help="training resolution (default: the config's; 64 for the small preset)")
    parser.add_argument("--ops", choices=["fused", "reference"], help="correspondence ops (default: the config's)")
    parser.add_argument("--no-perceptual", action="store_true", help="switch the VGG-19 perceptual loss off")
    parser.add_argument("--no-gan", action="store_true",
                        help="switch the adversarial and feature-matching losses off (L1 + warp only, no "
                             "discriminator step: the demo's and the real-video recipe's CPU setting)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="fp32, or bf16 autocast of the forward passes and losses (CUDA with compute "
                             "capability >= 8.0, or the CPU); weights and optimiser states stay fp32 (default fp32)")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels-last (NHWC) memory format for the networks and their inputs")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the generator and the discriminator (TorchInductor; the first steps "
                             "are slow while it compiles; checkpoints are unchanged)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    add_overwrite(parser, "train", replaced=" (its log.jsonl, config.json and samples/ are replaced)")
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep (default 3)")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    parser.add_argument("--sample-every", type=int, help="steps between sample grids (default: --checkpoint-every)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loader", default="auto", choices=["auto", "dali", "fallback"])
    parser.add_argument("--num-workers", type=int, default=0, help="fallback loader worker processes (default 0)")
    add_device(parser, help="training device (default: cuda when available, else cpu; under torchrun "
                                         "'cuda' or 'cpu': rank r uses cuda:LOCAL_RANK)")
    add_face_model(parser, default=None,
                   help="the face model the dataset was fitted with (default: the one its parameter files name: "
                        "mediapipe for `reenact prepare`'s real videos, toy for `reenact synth`)")
    parser.add_argument("--lr-g", type=float, default=1e-4, help="generator Adam learning rate (default 1e-4)")
    parser.add_argument("--lr-d", type=float, default=4e-4, help="discriminator Adam learning rate (default 4e-4)")
    add_quiet(parser)



def run(args):
    """``reenact train``: validate the options, then train (one process or one torchrun rank)."""
    # Checked before any work: checkpoints are safetensors; the fallback loader decodes with PyAV.
    require("reenact train", "safetensors", *(("av",) if args.loader == "fallback" else ()))
    options = TrainOptions(
        data=args.data, out=args.out, config=args.config, steps=args.steps, batch_size=args.batch_size,
        resolution=args.resolution, ops=args.ops, perceptual=not args.no_perceptual, gan=not args.no_gan,
        resume=args.resume,
        overwrite=args.overwrite, keep_last=args.keep_last, checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every,
        seed=args.seed, loader=args.loader, device=args.device, face_model=args.face_model,
        lr_g=args.lr_g, lr_d=args.lr_d, num_workers=args.num_workers, progress=not args.quiet,
        precision=args.precision, channels_last=args.channels_last, compile=args.compile)
    with reported(TrainingError, usage=True):
        options.validate()
    try:
        world = World.from_env()
        last = train(options)
    except TrainingError as err:
        raise CommandError(str(err)) from None
    except RuntimeError as err:
        if options.device and "cuda" in str(err).lower():
            raise CommandError(f"--device {options.device}: {err}") from None
        raise
    if world.is_main:
        print(f"trained to step {options.steps}; last checkpoint {last}")
    return 0
