"""Reenactor forward+backward: time and peak memory, fused ops against the reference ops.

    python bench/bench_model.py --out bench/out            # CPU, 128x128, small config
    python bench/bench_model.py --smoke --out /tmp/bench   # seconds: 64x64, 1 repeat
    python bench/bench_model.py --device cuda --config paper --resolution 256 --batch 16 \
        --dtype bfloat16 --out bench/out                    # the GPU row of issue 6

One step is the generator forward, its reconstruction + warp loss and the backward pass; the
discriminator and the perceptual loss are left out because they cost the same with either ops
and would only dilute the comparison. Both ops run on the same weights and inputs, in interleaved
rounds, after a warm-up. The time is the median; the peak memory is the most memory allocated
during one step above what existed before it (CUDA: the allocator's peak; CPU: the profiler's
allocation timeline replayed). On a shared CPU machine the wall time swings with other users'
load; the median CPU time of the process (all threads) swings much less, so it is reported too.
Prints a markdown table and writes it with a JSON of the rows.
"""
import argparse
import dataclasses
import json
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "tests"), str(ROOT / "bench")]

import torch  # noqa: E402

from model_fixtures import synthetic_batch  # noqa: E402  (the tests' inputs)
from reenact.model import LossConfig, ReenactmentLoss, Reenactor, ReenactorConfig  # noqa: E402
from bench_corr import peak_bytes  # noqa: E402  (CUDA allocator peak, or the CPU profiler's)

OPS = ("fused", "reference")
DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_step(model, losses, batch, autocast_dtype, device):
    inputs = (batch["source_image"], batch["source_pncc"], batch["driving_pncc"])

    def step():
        with torch.autocast(device, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            outputs = model(*inputs)
            result = losses.generator_loss(outputs, batch["driving_image"], batch["driving_pncc"])
        result.total.backward()
        for parameter in model.parameters():
            parameter.grad = None

    return step


def run(config_name, resolution, batch_size, dtype_name, device, repeats, warmup,
        correspondence_level):
    torch.manual_seed(0)
    config = (ReenactorConfig.small(resolution) if config_name == "small"
              else ReenactorConfig.paper())
    # replace() re-runs the config's validation for the new resolution.
    config.model = dataclasses.replace(config.model, resolution=resolution,
                                       correspondence_level=correspondence_level)
    model = Reenactor(config.model).to(device)
    channels_last = device == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    losses = ReenactmentLoss(LossConfig(perceptual=0.0, adversarial=0.0, feature_matching=0.0))
    batch = {k: v.to(device) for k, v in synthetic_batch(batch_size, resolution).items()}
    if channels_last:
        batch = {k: v.contiguous(memory_format=torch.channels_last) for k, v in batch.items()}
    step = make_step(model, losses, batch, DTYPES[dtype_name], device)

    times = {ops: [] for ops in OPS}
    cpu_times = {ops: [] for ops in OPS}
    for _ in range(warmup):
        for ops in OPS:
            model.set_ops(ops)
            step()
    for _ in range(repeats):  # interleaved rounds, so drifting machine load hits both alike
        for ops in OPS:
            model.set_ops(ops)
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            times[ops].append(time.perf_counter() - start)
            cpu_times[ops].append(time.process_time() - cpu_start)
    rows = []
    for ops in OPS:
        model.set_ops(ops)
        seconds = statistics.median(times[ops])
        rows.append(dict(
            ops=ops, device=device, config=config_name, resolution=resolution,
            correspondence_size=resolution >> correspondence_level,
            batch=batch_size, dtype=dtype_name, channels_last=channels_last,
            ms=seconds * 1e3, it_per_s=1.0 / seconds,
            cpu_ms=statistics.median(cpu_times[ops]) * 1e3,
            peak_mib=peak_bytes(step, device) / 2**20,
            repeats=repeats,
        ))
    reference = rows[1]
    for row in rows:
        row["speedup_vs_reference"] = reference["ms"] / row["ms"]
        row["cpu_time_vs_reference"] = reference["cpu_ms"] / row["cpu_ms"]
        row["memory_vs_reference"] = reference["peak_mib"] / row["peak_mib"]
    return rows


def markdown(rows):
    lines = [
        "| ops | device | config | res | corr | batch | dtype | ms/step | it/s | CPU ms/step | "
        "peak MiB | speed vs ref | CPU time vs ref | memory vs ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ops']} | {r['device']} | {r['config']} | {r['resolution']} | "
            f"{r['correspondence_size']}^2 | {r['batch']} | "
            f"{r['dtype']} | {r['ms']:.1f} | {r['it_per_s']:.2f} | {r['cpu_ms']:.1f} | "
            f"{r['peak_mib']:.1f} | {r['speedup_vs_reference']:.2f}x | "
            f"{r['cpu_time_vs_reference']:.2f}x | {r['memory_vs_reference']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "out", help="output directory")
    parser.add_argument("--smoke", action="store_true", help="64x64, batch 1, one repeat")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--config", default="small", choices=("small", "paper"))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--correspondence-level", type=int, default=2, choices=(1, 2),
                        help="pyramid level of corr_warp: 2 = 1/4 resolution, 1 = 1/2")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (default: torch's); 1 is robust to other load")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is visible")
    if args.smoke:
        args.resolution, args.batch, args.repeats, args.warmup = 64, 1, 1, 1
    rows = run(args.config, args.resolution, args.batch, args.dtype, args.device, args.repeats,
               args.warmup, args.correspondence_level)
    table = markdown(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads")
    stem = (f"bench_model_{args.device}_{args.config}_{args.resolution}"
            f"_corr{args.resolution >> args.correspondence_level}_{args.dtype}")
    if args.device == "cpu":
        stem += f"_{torch.get_num_threads()}threads"
    (args.out / f"{stem}.md").write_text(f"Machine: {machine}; torch {torch.__version__}\n\n"
                                         + table)
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"machine": machine, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(table, end="")


if __name__ == "__main__":
    main()
