"""Benchmark of pncc_cuda.corr_warp against the unfused reference and torch's SDPA.

Workload (DESIGN.md): N = 64x64 = 4096 queries and keys, C = 256, Cv = 256 (and Cv = 3 for an RGB
warp), forward and forward+backward, at B = 1, 4 and 16 (CPU: B = 1 and 4; B = 16 takes minutes
per row on a 2-core machine). Rows:
  corr_warp  the fused op (on the CPU: the path its calibration chose, named in the table);
  corr_warp [simd], corr_warp [aten]
             CPU only, on a CPU with AVX-512F: the fused op forced onto the project's AVX-512
             kernels or onto ATen's GEMMs (csrc/corr/corr_cpu_path.h), to check the choice;
  corr_warp [bf16]
             CPU, bfloat16 inputs, on a CPU with AVX512-BF16: forced onto the project's
             vdpbf16ps tile products (csrc/corr/corr_cpu_bf16.h);
  unfused    pncc_cuda.reference.corr_warp_reference (normalise, matmul, softmax, matmul);
  sdpa       torch.nn.functional.scaled_dot_product_attention on explicitly normalised inputs,
             scale = 1/temperature (what a user would write instead); with --sdpa-backends, one
             row per SDPA backend (flash, efficient, cudnn, math) pinned with sdpa_kernel, and a
             backend that rejects the shape (e.g. flash with Cv != C) listed as "rejected".
Reported: median ms, TFLOP/s, peak memory, and speed ratios against SDPA (the fastest SDPA
backend that accepted the shape) and unfused measured in the same run. The implementations are timed in interleaved rounds, so a noisy neighbour slows
all of them alike.

FLOPs: forward = 2*B*Nq*Nk*(C + Cv) (two matrix products; 4*B*Nq*Nk*C when Cv = C), forward +
backward = 3.5 x forward (the 2 + 5 matrix products of a flash-style pass; recomputation is not
counted as useful work).

    python bench/bench_corr.py                 # CPU (or --device cuda), markdown + bench/out/*.json
    python bench/bench_corr.py --smoke         # tiny sizes, a few seconds (CI)
    python bench/bench_corr.py --device cuda --batches 16 --cv 258 256 --sdpa-backends   # gpu_check
    python -m pytest bench/bench_corr.py       # pytest-benchmark, smoke sizes unless BENCH_FULL=1
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import time
import warnings

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import pncc_cuda  # noqa: E402
from _common import describe as describe_cpu, interleaved_times, peak_bytes, random_qkv, sync  # noqa: E402
from pncc_cuda.reference import corr_warp_normalize, corr_warp_reference  # noqa: E402

TEMPERATURE = 0.01


def sdpa(q, k, v, temperature):
    q, k = corr_warp_normalize(q), corr_warp_normalize(k)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0 / temperature)


# The mode this process started in (PNCC_CORR_SIMD, "auto" when unset): the "corr_warp" row's.
START_MODE = torch.ops.pncc._corr_cpu_path_mode("")


def on_cpu_path(mode):
    """corr_warp with the CPU path mode set first (a mutex and a flag: negligible in the timing)."""
    def fn(q, k, v, t):
        torch.ops.pncc._corr_cpu_path_mode(mode)
        return pncc_cuda.corr_warp(q, k, v, t)
    return fn


IMPLS = {
    "corr_warp": on_cpu_path(START_MODE),
    "corr_warp [simd]": on_cpu_path("simd"),
    "corr_warp [aten]": on_cpu_path("aten"),
    "corr_warp [bf16]": on_cpu_path("bf16"),
    "unfused": lambda q, k, v, t: corr_warp_reference(q, k, v, t),
    "sdpa": sdpa,
}
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def pinned_sdpa(backend):
    """SDPA restricted to one backend; raises RuntimeError when that backend rejects the call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn(q, k, v, temperature):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return sdpa(q, k, v, temperature)
    return fn


def implementations(device, sdpa_backends, q, k, v):
    """{row name: fn} and {row name: why it was not run}, probing each pinned backend once on
    the real inputs (a backend's support depends on dtype, head dims and device)."""
    impls = {name: IMPLS[name] for name in impls_for(device, q.dtype)
             if not (sdpa_backends and name == "sdpa")}
    rejected = {}
    for backend in SDPA_BACKENDS if sdpa_backends else ():
        name = "sdpa:" + backend.removesuffix("_ATTENTION").lower()
        fn = pinned_sdpa(backend)
        try:
            # SDPA says why a backend refused the call in warnings, then raises a generic error.
            with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn(q, k, v, TEMPERATURE)
        except RuntimeError as err:
            reasons = [str(w.message) for w in caught] + [str(err)]
            rejected[name] = " ".join(reasons[0].split())[:160]
            continue
        impls[name] = fn
    return impls, rejected


def impls_for(device, dtype):
    """The rows that apply: the forced-path rows only on a CPU that has more than one path, the
    bf16 one only for bfloat16 inputs on a CPU with AVX512-BF16."""
    stats = torch.ops.pncc._corr_cpu_path_stats() if device == "cpu" else [0] * 7
    forced = {"corr_warp [simd]": stats[0] == 1, "corr_warp [aten]": stats[0] == 1,
              "corr_warp [bf16]": stats[4] == 1 and dtype == torch.bfloat16}
    return [name for name in IMPLS if forced.get(name, True)]


def calibration_ms(C, Cv, bf16=False):
    """Milliseconds of the CPU path calibration of one shape class (a fresh one is forced; for
    bf16 inputs, the fp32 class's calibration is run first, untimed, as it is its incumbent)."""
    previous = torch.ops.pncc._corr_cpu_path_mode("recalibrate")
    if bf16:
        torch.ops.pncc._corr_cpu_path(C, Cv)
    start = time.perf_counter()
    path = torch.ops.pncc._corr_cpu_path(C, Cv, bf16)
    ms = (time.perf_counter() - start) * 1e3
    torch.ops.pncc._corr_cpu_path_mode(previous)
    return path, ms


def make_step(fn, q, k, v, grad_out, backward):
    if not backward:
        def step():
            with torch.no_grad():
                fn(q, k, v, TEMPERATURE)
        return step

    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def step():
        fn(*leaves, TEMPERATURE).backward(grad_out)
        for t in leaves:
            t.grad = None
    return step


def run_config(device, dtype, B, N, C, Cv, backward, repeats, warmup=1, sdpa_backends=False):
    q, k, v = random_qkv(B, N, N, C, Cv, dtype=dtype, device=device)
    grad_out = torch.randn(B, N, Cv, dtype=dtype, device=device)
    impls, rejected = implementations(device, sdpa_backends, q, k, v)
    steps = {name: make_step(fn, q, k, v, grad_out, backward) for name, fn in impls.items()}
    if device == "cpu":
        torch.ops.pncc._corr_cpu_path_mode(START_MODE)
        path = torch.ops.pncc._corr_cpu_path(C, Cv, dtype == torch.bfloat16)
    else:
        path = None
    # cpu_times: process CPU time (all threads), reported for the CPU device only.
    times, cpu_times = interleaved_times(steps, device, repeats, warmup)
    flops = 2.0 * B * N * N * (C + Cv) * (3.5 if backward else 1.0)
    shape = dict(device=device, dtype=str(dtype).removeprefix("torch."), B=B, N=N, C=C, Cv=Cv,
                 pass_="fwd+bwd" if backward else "fwd")
    rows = []
    for name, step in steps.items():
        ms = statistics.median(times[name]) * 1e3
        impl = f"corr_warp [{path}, chosen]" if name == "corr_warp" and path else name
        cpu_ms = statistics.median(cpu_times[name]) * 1e3 if device == "cpu" else None
        rows.append(dict(impl=impl, **shape, ms=ms, ms_all=[t * 1e3 for t in times[name]],
                         cpu_ms=cpu_ms,
                         tflops=flops / (ms * 1e-3) / 1e12,
                         peak_mib=peak_bytes(step, device) / 2**20))
    sdpa_ms = min(r["ms"] for r in rows if r["impl"].startswith("sdpa"))
    unfused_ms = next(r["ms"] for r in rows if r["impl"] == "unfused")
    sdpa_cpu = min((r["cpu_ms"] for r in rows if r["impl"].startswith("sdpa")), default=None)
    for r in rows:
        r["speed_vs_sdpa"] = sdpa_ms / r["ms"]
        r["speed_vs_unfused"] = unfused_ms / r["ms"]
        # On a shared machine the CPU-time ratio is the steadier one (a descheduled thread does
        # not count); on a quiet one the two agree.
        r["cpu_speed_vs_sdpa"] = sdpa_cpu / r["cpu_ms"] if sdpa_cpu and r["cpu_ms"] else None
    rows += [dict(impl=name, **shape, ms=None, rejected=why) for name, why in rejected.items()]
    return rows


def markdown(rows):
    lines = ["| device | dtype | B | Cv | pass | impl | ms (median) | TFLOP/s | peak MiB | "
             "x SDPA | x unfused | CPU ms (median) | x SDPA, CPU time |", "|" + "---|" * 13]
    for r in rows:
        head = f"| {r['device']} | {r['dtype']} | {r['B']} | {r['Cv']} | {r['pass_']} | {r['impl']} "
        if r["ms"] is None:
            lines.append(head + f"| rejected: {r['rejected']} | | | | | | |")
            continue
        cpu = (f"{r['cpu_ms']:.1f} | {r['cpu_speed_vs_sdpa']:.2f}" if r.get("cpu_speed_vs_sdpa")
               else "- | -")
        lines.append(
            head + f"| {r['ms']:.1f} | {r['tflops']:.3f} | {r['peak_mib']:.1f} | "
            f"{r['speed_vs_sdpa']:.2f} | {r['speed_vs_unfused']:.2f} | {cpu} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA)")
    parser.add_argument("--batches", type=int, nargs="*", default=None)
    parser.add_argument("--cv", type=int, nargs="*", default=[256, 3])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--c", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sdpa-backends", action="store_true",
                        help="one SDPA row per backend (flash, efficient, cudnn, math) instead of "
                             "torch's own choice")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "out",
                        help="folder for bench_corr_DEVICE.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    batches = args.batches or ([1, 4] if args.device == "cpu" else [1, 4, 16])
    n, c, cvs, repeats = args.n, args.c, args.cv, args.repeats
    if args.smoke:
        batches, n, c, cvs, repeats = [1], 256, 32, [32, 3], 3
    rows = []
    for B in batches:
        for cv in cvs:
            for backward in (False, True):
                rows += run_config(args.device, dtype, B, n, c, cv, backward, repeats,
                                   sdpa_backends=args.sdpa_backends)
    table = markdown(rows)
    cpu = describe_cpu()
    print(f"CPU: {cpu}\n")
    if args.device == "cpu":
        for cv in cvs:
            path, ms = calibration_ms(c, cv, dtype == torch.bfloat16)
            engine = ""
            if path == "bf16":  # which instructions the bf16 kernels run on
                on_amx = torch.ops.pncc._corr_cpu_path_stats()[6] == 1
                engine = " (AMX tiles)" if on_amx else " (AVX512-BF16; no AMX or PNCC_CORR_AMX=0)"
            print(f"CPU path calibration for C={c}, Cv={cv}, {dtype}: {ms:.1f} ms, chose {path}"
                  f"{engine}")
        print("(a fresh calibration, timed for its cost; the rows marked 'chosen' ran on the "
              "process's first one, which may differ where two paths are within its 10% margin)")
        print()
    print(table)
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"bench_corr_{args.device}{'_smoke' if args.smoke else ''}.json"
    (out_dir / name).write_text(json.dumps(dict(
        machine=dict(device=args.device, cpu=cpu, threads=torch.get_num_threads(),
                     torch=torch.__version__,
                     gpu=torch.cuda.get_device_name() if args.device == "cuda" else None),
        rows=rows), indent=1))
    return rows


# ---- pytest-benchmark entry points (smoke sizes unless BENCH_FULL=1) ------------------------

_FULL = os.environ.get("BENCH_FULL") == "1"
_SIZES = dict(B=1, N=4096, C=256, Cv=256) if _FULL else dict(B=1, N=256, C=32, Cv=32)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_bench_corr(benchmark, device, backward, impl):
    # bench/ has no conftest of its own: skip here, at run time, rather than query at import.
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; none is visible")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if impl not in impls_for(device, dtype):
        pytest.skip(f"{impl}: this CPU (or dtype) has no such corr_warp path")
    s = _SIZES
    q, k, v = random_qkv(s["B"], s["N"], s["N"], s["C"], s["Cv"], dtype=dtype, device=device)
    grad_out = torch.randn(s["B"], s["N"], s["Cv"], dtype=dtype, device=device)
    step = make_step(IMPLS[impl], q, k, v, grad_out, backward)

    def timed():
        step()
        sync(device)

    benchmark.pedantic(timed, rounds=5 if _FULL else 10, warmup_rounds=1)


if __name__ == "__main__":
    main()
