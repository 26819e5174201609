"""Does the geometric warp help the learned model? Self-reenactment with and without
``ModelConfig.geometric_input``, beside the trivial baselines, on the same held-out pairs.

Two models are trained from the same config, seed and data, differing only in
``geometric_input``; ``reenact eval`` (``--detector none``) scores each on held-out clips. Rows:
  - ``model + geometric input``: the generator given the warped source and its hole mask;
  - ``model (PNCC only)``: today's generator;
  - ``geometric warp``: the training-free warp (reenact.warp), no learning;
  - ``copy source``: the source frame unchanged.

Datasets:
  - ``--synthetic``: the demo recipe's data and losses (``reenact demo``: 128 toy-head clips,
    2 held-out clips of unseen identities), ``--steps`` (default the recipe's 1,100);
  - ``--real TRAIN HELD``: two prepared datasets (``reenact prepare`` of
    ``../shared/data/real-videos/``, the built-in mediapipe model), the same recipe at 64x64.

It writes ``OUT/table.md`` and ``OUT/grid.png`` (source | driving | geometric warp | model +
geometric input | PNCC-only model, a few held-out pairs).

    python bench/bench_geometric_input.py --synthetic --out /tmp/geo-synth
    python bench/bench_geometric_input.py --real TRAIN_DIR HELD_DIR --steps 600 --out /tmp/geo-real
"""
import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if any((ROOT / "pncc_cuda").glob("_C*.so")):
    sys.path[:0] = [str(ROOT), str(ROOT / "python")]

from reenact import demo, eval as evaluate  # noqa: E402
from reenact.model import ReenactorConfig  # noqa: E402
from reenact import training  # noqa: E402
from reenact.training import TrainOptions, load_generator, train  # noqa: E402

VARIANTS = {"model + geometric input": True, "model (PNCC only)": False}
VARIANTS_BY_FLAG = {"geometric": "model + geometric input", "plain": "model (PNCC only)"}
METRICS = (("l1", "L1", 4), ("psnr", "PSNR dB", 2), ("ssim", "SSIM", 4))


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def config_file(path, resolution, geometric, recipe):
    config = ReenactorConfig.small(resolution).to_dict()
    config["model"]["geometric_input"] = geometric
    config["loss"].update(reconstruction=recipe.reconstruction, warp=recipe.warp,
                          adversarial=recipe.adversarial, feature_matching=recipe.feature_matching)
    ReenactorConfig.from_dict(config).to_json(path)
    return path


def train_variant(out, data, resolution, steps, geometric, seed, recipe):
    """Train one variant, or reuse the same ``--out``'s finished run of it (its last checkpoint and
    the CPU seconds it took), so variants can be trained by separate processes (``--only``)."""
    run = out / ("run-geometric" if geometric else "run-plain")
    finished, timing = training.checkpoint_path(run, steps), run / "train_cpu_seconds.json"
    if finished.is_file() and timing.is_file():
        return finished, json.loads(timing.read_text())["seconds"]
    options = dict(data=str(data), out=str(run), steps=steps, checkpoint_every=steps, batch_size=recipe.batch_size,
                   config=str(config_file(out / f"config-{int(geometric)}.json", resolution, geometric, recipe)),
                   perceptual=False, seed=seed, loader="fallback", device="cpu", progress=False, keep_last=1,
                   overwrite=True, lr_g=recipe.lr_g, lr_d=recipe.lr_d)
    started = time.process_time()
    checkpoint = train(TrainOptions(**options))
    seconds = time.process_time() - started
    timing.write_text(json.dumps({"seconds": seconds}))
    return checkpoint, seconds


def sample_grid(path, checkpoints, heldout, pairs=4):
    """source | driving | geometric warp | each model, for ``pairs`` held-out pairs spread over the clips."""
    from PIL import Image

    from reenact.data.dataset import ClipDataset
    from reenact.face3d.loading import load_model
    from reenact.data.format import dataset_face_model

    dataset = ClipDataset(heldout)
    face_model = load_model(dataset_face_model(heldout) or "toy")
    specs, _ = evaluate.self_reenactment_pairs([clip.frames for clip in dataset.clips])
    picks = [specs[int(i)] for i in np.linspace(0, len(specs) - 1, pairs).round()]
    columns = []
    for name, checkpoint in checkpoints.items():
        generator, _ = load_generator(checkpoint)
        batch = next(evaluate.generate(generator, face_model, dataset, picks, batch_size=pairs))
        if not columns:
            columns = [batch["source"], batch["driving"], evaluate.geometric_baseline(face_model, batch, dataset.size)]
        columns.append(batch["output"])
    rows = torch.cat([torch.cat(list(column), 1) for column in columns], 2)  # (3, pairs H, columns W)
    image = ((rows.clamp(-1, 1) + 1) * 127.5 + 0.5).byte().permute(1, 2, 0).numpy()
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic", action="store_true", help="the demo recipe's data, losses and steps")
    source.add_argument("--real", nargs=2, metavar=("TRAIN", "HELD"), help="two prepared datasets")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the demo recipe's)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", choices=sorted(VARIANTS_BY_FLAG),
                        help="train just this variant (a later run with the same --out reuses it)")
    args = parser.parse_args()
    torch.set_num_threads(demo.THREADS)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Both datasets train with the demo recipe's losses and learning rates (L1 + warp loss, no GAN
    # terms: over a few hundred CPU steps they only add noise; lr 1e-3).
    recipe = demo.DemoRecipe(resolution=args.resolution)
    if args.synthetic:
        if not (out / "data" / "heldout" / "manifest.jsonl").is_file():
            demo.make_data(out, recipe, args.seed)
        data, heldout = out / "data" / "train", out / "data" / "heldout"
    else:
        data, heldout = (pathlib.Path(p) for p in args.real)
        for folder in (data, heldout):
            if not (folder / "manifest.jsonl").is_file():
                print(f"skipped: {folder} is not a prepared dataset (run `reenact prepare` on "
                      f"../shared/data/real-videos/ first)")
                return 0
    steps = args.steps or recipe.steps
    results, checkpoints, seconds = {}, {}, {}
    if args.only:
        geometric = VARIANTS[VARIANTS_BY_FLAG[args.only]]
        print("trained:", train_variant(out, data, args.resolution, steps, geometric, args.seed, recipe)[0])
        return 0
    for name, geometric in VARIANTS.items():
        checkpoints[name], seconds[name] = train_variant(out, data, args.resolution, steps, geometric, args.seed, recipe)
        results[name] = evaluate.evaluate(evaluate.EvalOptions(
            checkpoint=str(checkpoints[name]), data=str(heldout), out=str(out / f"eval-{int(geometric)}"),
            device="cpu", detector="none", progress=False, overwrite=True))
    first = results[next(iter(VARIANTS))]
    rows = {name: result["metrics"] for name, result in results.items()}
    rows.update(first["baselines"])
    lines = [f"{'synthetic (demo recipe)' if args.synthetic else 'real clips'}: {first['pairs']} held-out pairs in "
             f"{first['clips']} clips, {steps} steps at {args.resolution}x{args.resolution}, seed {args.seed}, "
             f"{demo.THREADS} thread, {cpu_name()}",
             "", "| method | " + " | ".join(label for _, label, _ in METRICS) + " | training CPU s |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    for name, metrics in rows.items():
        cells = [f"{metrics[key]['mean']:.{digits}f}" for key, _, digits in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds[name]:.0f} |" if name in seconds
                     else f"| {name} | " + " | ".join(cells) + " | - |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps({name: {k: m[k]["mean"] for k, _, _ in METRICS}
                                                  for name, m in rows.items()}, indent=1))
    sample_grid(out / "grid.png", checkpoints, heldout)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
