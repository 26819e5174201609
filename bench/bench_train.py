"""Training iterations/s and peak memory of `reenact train`, fused ops against `--ops reference`.

    python bench/bench_train.py                       # CPU row (128x128, small config, batch 4, fp32),
                                                      # plus the GPU row when CUDA is visible
    python bench/bench_train.py --threads 1           # CPU on one intra-op thread (steadier when shared)
    python bench/bench_train.py --smoke --out /tmp/b  # CI: 64x64, batch 2, a few steps, < 60 s

One iteration is `Trainer.train_step` of the real trainer: PNCC rendering of both frames, the
generator forward, its losses (L1, warp, hinge GAN, feature matching; no VGG perceptual loss,
which would cost the same for both rows), the G backward and Adam step, then the discriminator's
forward, backward and Adam step. Batches are decoded once before timing and replayed, so the
rows measure training, not video decoding (bench_data.py measures the loaders). `--ops` selects
the model's correspondence op (fused `corr_warp` or the pure-PyTorch reference); the training
PNCCs are rendered by the fused `render_pncc` in both rows (reenact.face3d calls pncc_cuda directly).

Both trainers are built from the same seed (same weights) and stepped in interleaved rounds after
a warm-up, so drifting machine load hits both alike. Reported: the median wall time per
iteration (it/s), the median CPU time of the process per iteration (all threads; it swings much
less than wall time on a shared machine), and the peak memory of one iteration above what
existed before it: on CUDA `torch.cuda.max_memory_allocated`, on the CPU every torch allocation
and free of the iteration from the profiler's allocation events (_common.peak_bytes); numpy and
Python allocations are not torch's and are not counted.

Rows: CPU at 128x128, small config, batch 4, fp32. GPU (when CUDA is visible): 256x256, paper
config, batch 16, bf16 autocast, channels-last. Writes train.json, train.md and train.png under
`--out` (default bench/out/train).
"""
import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "bench")]

import torch  # noqa: E402

from _common import interleaved_times, machine, peak_bytes  # noqa: E402
from reenact.data import synth  # noqa: E402
from reenact.model import ReenactorConfig  # noqa: E402
from reenact.training import Trainer, TrainOptions  # noqa: E402

OPS = ("fused", "reference")


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark row pair (fused and reference) on one device."""

    device: str
    config: str
    resolution: int
    batch: int
    precision: str
    channels_last: bool
    warmup: int
    repeats: int
    correspondence_level: int = 2


CASES = {
    "cpu": Case("cpu", "small", 128, 4, "fp32", False, warmup=2, repeats=9),
    "cuda": Case("cuda", "paper", 256, 16, "bf16", True, warmup=5, repeats=30),
}


def smoke(case):
    return dataclasses.replace(case, config="small", resolution=64, batch=2, warmup=1, repeats=2)


class _Replay:
    """Stands in for a trainer's DataStream: the same few decoded batches, over and over."""

    epoch = 0

    def __init__(self, batches):
        self.batches, self.index = batches, 0

    def next(self):
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch

    def close(self):
        """Nothing to release."""


def make_trainers(case, workdir):
    """Two trainers on the same weights and batches: {"fused": ..., "reference": ...}."""
    data = workdir / f"data-{case.resolution}"
    if not data.exists():
        synth.synth_dataset(data, 2 * case.batch, frames=8, size=case.resolution, codec="vp9", seed=0)
    config = ReenactorConfig.small(case.resolution) if case.config == "small" else ReenactorConfig.paper()
    # replace() re-runs the config's validation for the new resolution and level.
    config.model = dataclasses.replace(config.model, resolution=case.resolution,
                                       correspondence_level=case.correspondence_level)
    config_path = workdir / f"{case.config}-{case.resolution}-level{case.correspondence_level}.json"
    config.to_json(config_path)
    trainers, batches = {}, None
    for ops in OPS:
        options = TrainOptions(
            data=str(data), out=str(workdir / f"run-{case.device}-{ops}"), config=str(config_path),
            batch_size=case.batch, resolution=case.resolution, ops=ops, perceptual=False, loader="fallback",
            device=case.device, progress=False, precision=case.precision, channels_last=case.channels_last)
        trainer = Trainer(options)
        if batches is None:
            batches = [trainer.stream.next() for _ in range(2)]
        trainer.stream.close()
        trainer.stream = _Replay(batches)
        trainers[ops] = trainer
    return trainers


def run_case(case, workdir):
    trainers = make_trainers(case, workdir)
    times, cpu_times = interleaved_times({ops: trainer.train_step for ops, trainer in trainers.items()},
                                         case.device, case.repeats, case.warmup)
    rows = []
    for ops, trainer in trainers.items():
        seconds = statistics.median(times[ops])
        rows.append(dict(
            ops=ops, device=case.device, config=case.config, resolution=case.resolution, batch=case.batch,
            correspondence_size=case.resolution >> case.correspondence_level,
            precision=case.precision, channels_last=case.channels_last, threads=torch.get_num_threads(),
            ms=seconds * 1e3, it_per_s=1.0 / seconds, pairs_per_s=case.batch / seconds,
            cpu_ms=statistics.median(cpu_times[ops]) * 1e3,
            peak_mib=peak_bytes(trainer.train_step, case.device) / 2**20,
            repeats=case.repeats, ms_all=[t * 1e3 for t in times[ops]]))
    reference = rows[OPS.index("reference")]
    for row in rows:
        row["speed_vs_reference"] = reference["ms"] / row["ms"]
        row["cpu_time_vs_reference"] = reference["cpu_ms"] / row["cpu_ms"]
        row["memory_vs_reference"] = reference["peak_mib"] / row["peak_mib"]
    return rows


def markdown(rows):
    lines = ["| device | ops | config | res | corr | batch | precision | threads | ms/it | it/s | CPU ms/it | "
             "peak MiB | speed vs ref | CPU time vs ref | memory vs ref |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        precision = r["precision"] + (", NHWC" if r["channels_last"] else "")
        lines.append(
            f"| {r['device']} | {r['ops']} | {r['config']} | {r['resolution']} | {r['correspondence_size']}^2 | "
            f"{r['batch']} | {precision} | "
            f"{r['threads']} | {r['ms']:.1f} | {r['it_per_s']:.2f} | {r['cpu_ms']:.1f} | {r['peak_mib']:.1f} | "
            f"{r['speed_vs_reference']:.2f}x | {r['cpu_time_vs_reference']:.2f}x | {r['memory_vs_reference']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['device']} {r['resolution']}px corr {r['correspondence_size']}^2 B={r['batch']}\n{r['ops']}"
              for r in rows]
    colours = ["tab:gray" if r["ops"] == "reference" else "tab:blue" for r in rows]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 0.5 * len(rows) + 1.2))
    for ax, key, label in ((speed, "it_per_s", "training iterations / s"), (memory, "peak_mib", "peak MiB / iteration")):
        ax.barh(range(len(rows)), [r[key] for r in rows], color=colours)
        ax.set_yticks(range(len(rows)), labels if ax is speed else [""] * len(rows), fontsize=7)
        ax.set_xlabel(label)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "out" / "train")
    parser.add_argument("--smoke", action="store_true", help="64x64, batch 2, small config, 1+2 steps per row")
    parser.add_argument("--devices", nargs="+", choices=tuple(CASES),
                        help="default: cpu, plus cuda when a CUDA device is visible")
    parser.add_argument("--repeats", type=int, help="timed iterations per row (default: 9 CPU, 30 CUDA)")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--correspondence-level", type=int, choices=(1, 2),
                        help="pyramid level of corr_warp: 2 = 1/4 resolution (the configs' default), 1 = 1/2")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices cuda, but no CUDA device is visible")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train-") as workdir:
        for device in devices:
            case = smoke(CASES[device]) if args.smoke else CASES[device]
            if args.repeats is not None:
                case = dataclasses.replace(case, repeats=args.repeats)
            if args.correspondence_level is not None:
                case = dataclasses.replace(case, correspondence_level=args.correspondence_level)
            rows += run_case(case, pathlib.Path(workdir))
    table = markdown(rows)
    info = machine(raster_cull_variant=torch.ops.pncc._raster_cpu_variant())
    print(f"Machine: {info}\n")
    print(table, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.md").write_text(f"Machine: {info}\n\n" + table)
    (args.out / "train.json").write_text(json.dumps({"machine": info, "smoke": args.smoke, "rows": rows}, indent=2) + "\n")
    try:
        plot(rows, args.out / "train.png")
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
