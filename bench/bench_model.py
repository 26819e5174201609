"""Reenactor forward+backward: time and peak memory, fused ops against the reference ops; and the
generator's inference throughput as `reenact reenact` runs it, source encoded once against forward
per batch.

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

Inference (`--animate-batch`, 8 by default; the model in eval mode, no_grad, fused ops): one
round generates one batch of driving frames of a single source, the inner loop of
`reenact.inference.animate`. "forward per batch" calls `forward` on the source crop and P_s
expanded to the batch (animate before the source stage was split out); "encode once + drive"
calls `drive` on a batch-1 `encode_source` made once before the rounds, as animate does now (its
one-off cost per clip is reported as "encode ms"). Both run on the same weights and inputs, in
interleaved rounds after a warm-up; frames/s = batch / median time per batch. "per-round speed"
is the median over rounds of the two calls' time ratio within a round, steadier under drifting load.

Prints markdown tables and writes them with a JSON of the rows.
"""
import argparse
import dataclasses
import json
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "bench")]

import torch  # noqa: E402

from reenact.model import LossConfig, ReenactmentLoss, Reenactor, ReenactorConfig  # noqa: E402
from reenact.model.testing import synthetic_batch  # noqa: E402  (the model tests' inputs)
from _common import describe as describe_cpu, interleaved_times, peak_bytes  # noqa: E402

OPS = ("fused", "reference")
DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def build_model(config_name, resolution, correspondence_level, device):
    """The generator of a preset at ``resolution`` (fused ops) -> (model, channels_last);
    channels-last on CUDA."""
    torch.manual_seed(0)
    config = (ReenactorConfig.small(resolution) if config_name == "small"
              else ReenactorConfig.paper())
    # replace() re-runs the config's validation for the new resolution.
    config.model = dataclasses.replace(config.model, resolution=resolution,
                                       correspondence_level=correspondence_level, ops="fused")
    model = Reenactor(config.model).to(device)
    channels_last = device == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, channels_last


def to_device(batch, device, channels_last):
    """The tensors of ``batch`` on ``device``, channels-last when asked."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return {k: v.to(device).contiguous(memory_format=memory_format) for k, v in batch.items()}


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
    model, channels_last = build_model(config_name, resolution, correspondence_level, device)
    losses = ReenactmentLoss(LossConfig(perceptual=0.0, adversarial=0.0, feature_matching=0.0))
    batch = to_device(synthetic_batch(batch_size, resolution), device, channels_last)
    step = make_step(model, losses, batch, DTYPES[dtype_name], device)
    times, cpu_times = interleaved_times({ops: step for ops in OPS}, device, repeats, warmup,
                                         prepare=model.set_ops)
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


ANIMATE_MODES = ("forward per batch", "encode once + drive")


def run_animate(config_name, resolution, batch_size, dtype_name, device, repeats, warmup,
                correspondence_level):
    """Rows of the inference comparison (module docstring), the same config as `run`."""
    model, channels_last = build_model(config_name, resolution, correspondence_level, device)
    model.eval()
    batch = to_device(synthetic_batch(batch_size, resolution, seed=1), device, channels_last)
    # One source, batch_size driving frames: the source of the first pair, as animate's crop.
    source_image, source_pncc = batch["source_image"][:1], batch["source_pncc"][:1]
    driving_pncc = batch["driving_pncc"]
    autocast_dtype = DTYPES[dtype_name]

    def autocast():
        return torch.autocast(device, dtype=autocast_dtype or torch.float32,
                              enabled=autocast_dtype is not None)

    def encode():
        with torch.no_grad(), autocast():
            return model.encode_source(source_image, source_pncc)

    encoding = encode()

    def forward_per_batch():
        with torch.no_grad(), autocast():
            return model(source_image.expand(batch_size, -1, -1, -1),
                         source_pncc.expand(batch_size, -1, -1, -1), driving_pncc)["output"]

    def drive():
        with torch.no_grad(), autocast():
            return model.drive(encoding, driving_pncc)["output"]

    steps = dict(zip(ANIMATE_MODES, (forward_per_batch, drive)))
    max_difference = (steps[ANIMATE_MODES[0]]().float()
                      - steps[ANIMATE_MODES[1]]().float()).abs().max().item()
    # The one-off encode is timed in each round too, before the two per-batch calls.
    times, cpu_times = interleaved_times({"encode": encode, **steps}, device, repeats, warmup)
    encode_times = times["encode"]
    rows = []
    for mode, step in steps.items():
        seconds = statistics.median(times[mode])
        rows.append(dict(
            mode=mode, device=device, config=config_name, resolution=resolution,
            correspondence_size=resolution >> correspondence_level,
            batch=batch_size, dtype=dtype_name, channels_last=channels_last,
            ms=seconds * 1e3, ms_per_frame=seconds * 1e3 / batch_size,
            frames_per_s=batch_size / seconds,
            cpu_ms=statistics.median(cpu_times[mode]) * 1e3,
            encode_ms=(statistics.median(encode_times) * 1e3
                       if mode == "encode once + drive" else None),
            peak_mib=peak_bytes(step, device) / 2**20,
            max_abs_difference=max_difference, repeats=repeats,
        ))
    baseline = rows[0]
    for row in rows:
        row["speedup_vs_forward"] = baseline["ms"] / row["ms"]
        row["cpu_time_vs_forward"] = baseline["cpu_ms"] / row["cpu_ms"]
        # Each round times both calls back to back: the median of the per-round ratios cancels
        # load that drifts between rounds, which the ratio of the two medians does not.
        row["paired_speedup_vs_forward"] = statistics.median(
            f / t for f, t in zip(times[ANIMATE_MODES[0]], times[row["mode"]]))
    return rows


def markdown_animate(rows):
    lines = [
        "| generator call | device | config | res | batch | dtype | ms/batch | ms/frame | frames/s | "
        "CPU ms/batch | encode ms (once per clip) | peak MiB | speed vs forward | "
        "CPU time vs forward | per-round speed vs forward |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        encode = "-" if r["encode_ms"] is None else f"{r['encode_ms']:.1f}"
        lines.append(
            f"| {r['mode']} | {r['device']} | {r['config']} | {r['resolution']} | {r['batch']} | "
            f"{r['dtype']} | {r['ms']:.1f} | {r['ms_per_frame']:.2f} | {r['frames_per_s']:.1f} | "
            f"{r['cpu_ms']:.1f} | {encode} | {r['peak_mib']:.1f} | "
            f"{r['speedup_vs_forward']:.2f}x | {r['cpu_time_vs_forward']:.2f}x | "
            f"{r['paired_speedup_vs_forward']:.2f}x |")
    lines.append(f"\nlargest |output difference| between the two: "
                 f"{rows[0]['max_abs_difference']:.2e}")
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--smoke", action="store_true",
                        help="64x64, batch 1 (inference: 2), one repeat")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--config", default="small", choices=("small", "paper"))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--animate-batch", type=int, default=8,
                        help="driving frames per generator call of the inference rows (0: skip them)")
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
        args.animate_batch = min(args.animate_batch, 2)
    if args.animate_batch < 0:
        parser.error(f"--animate-batch must be >= 0, got {args.animate_batch}")
    rows = run(args.config, args.resolution, args.batch, args.dtype, args.device, args.repeats,
               args.warmup, args.correspondence_level)
    table = markdown(rows)
    animate_rows = []
    if args.animate_batch:
        animate_rows = run_animate(args.config, args.resolution, args.animate_batch, args.dtype,
                                   args.device, args.repeats, args.warmup,
                                   args.correspondence_level)
        table += "\nInference (`reenact reenact`'s generator calls), one source:\n\n"
        table += markdown_animate(animate_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = (torch.cuda.get_device_name() if args.device == "cuda" else describe_cpu())
    stem = (f"bench_model_{args.device}_{args.config}_{args.resolution}"
            f"_corr{args.resolution >> args.correspondence_level}_{args.dtype}")
    if args.device == "cpu":
        stem += f"_{torch.get_num_threads()}threads"
    (args.out / f"{stem}.md").write_text(f"Machine: {machine}; torch {torch.__version__}\n\n"
                                         + table)
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"machine": machine, "torch": torch.__version__, "rows": rows,
         "animate_rows": animate_rows}, indent=2) + "\n")
    print(f"Machine: {machine}; torch {torch.__version__}\n")
    print(table, end="")


if __name__ == "__main__":
    main()
