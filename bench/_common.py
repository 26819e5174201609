"""What every benchmark shares: timing (interleaved rounds, device synchronisation), peak memory
(the CUDA allocator's, or the CPU profiler's replay) and machine facts for every table header.

The CPU facts are `lscpu`'s model name with its family and model numbers, the flags that decide
which kernels run (AVX2, AVX-512, AVX512-BF16, AMX), and torch's thread count. Under a hypervisor
the model name can be just "AMD EPYC" for both Zen 4 (family 25, whose AVX-512 FMAs run at the
AVX2 rate) and Zen 5 (family 26, twice that): only the numbers tell them apart. Results measured
on one CPU family say little about another (bench/RESULTS.md: MKL runs its AVX2 code on AMD and
its AVX-512 code on Intel), so no table leaves this out.

Benchmarks import this module and the packages; never the tests, never each other. Nothing under
tests/ imports it.
"""
import platform
import random
import re
import subprocess
import time

import torch

from pncc_cuda.testing import peak_cpu_bytes

__all__ = ["cpu_flags", "cpu_model", "describe", "interleaved_times", "machine", "peak_bytes", "peak_cpu_bytes",
           "random_qkv", "sync"]

# The flags that change which code runs: the corr_warp AVX-512 kernels, the rasterizer's culling
# variants, oneDNN's bf16 and AMX paths.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _lscpu():
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _field(text, key):
    match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def cpu_model():
    """`lscpu`'s model name and family/model numbers, e.g. 'AMD EPYC (family 25 model 17)' (or
    /proc/cpuinfo's, or platform's answer)."""
    for text, keys in ((_lscpu(), ("Model name", "CPU family", "Model")),
                       (_cpuinfo(), ("model name", "cpu family", "model"))):
        name, family, model = (_field(text, key) for key in keys)
        if name:
            return f"{name} (family {family} model {model})" if family and model else name
    return platform.processor() or platform.machine()


def cpu_flags():
    """The RELEVANT_FLAGS this CPU reports, in that order."""
    text = _lscpu() + "\n" + _cpuinfo()
    flags = set()
    for match in re.finditer(r"^(?:Flags|flags)\s*:\s*(.+)$", text, re.MULTILINE):
        flags.update(match.group(1).split())
    return [f for f in RELEVANT_FLAGS if f in flags]


def describe():
    """One line for a table header, e.g. 'AMD EPYC [avx2 fma avx512f avx512_bf16], 2 threads,
    torch 2.x'."""
    return (f"{cpu_model()} [{' '.join(cpu_flags()) or 'no AVX2'}], "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")


def machine(**extra):
    """The machine facts of a benchmark's JSON: CPU line, threads, torch, the GPU when one is visible."""
    info = {"cpu": describe(), "threads": torch.get_num_threads(), "torch": torch.__version__, **extra}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sync(device):
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_times(steps, device, repeats, warmup, prepare=None, sparse=(),
                      cpu_clock=time.process_time):
    """Wall and CPU seconds of each callable of ``steps`` (name -> step), timed in interleaved
    rounds after ``warmup`` untimed ones, so drifting machine load hits every step alike
    -> ({name: [wall s]}, {name: [CPU s]}).

    Each round runs the steps in a shuffled order (seeded by the round, so runs repeat), so every
    step follows every other step about equally often: in a fixed order a step that evicts the
    caches (a slow reference streaming hundreds of MB) would always precede the same step, and
    only that step would pay for the cold caches. (A rotation would not do: with a sparse step
    every third round it lines up with a period of three.) The names in ``sparse`` (slow
    references) are timed only every third round. ``cpu_clock`` is
    time.process_time, or time.thread_time for single-thread rows (a busy neighbour does not
    stretch it). ``prepare(name)``, when given, runs before each call, outside the timing."""
    times = {name: [] for name in steps}
    cpu_times = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        order = list(steps)
        random.Random(round_).shuffle(order)
        for name in order:
            if name in sparse and round_ >= warmup and (round_ - warmup) % 3:
                continue
            if prepare is not None:
                prepare(name)
            sync(device)
            start, cpu_start = time.perf_counter(), cpu_clock()
            steps[name]()
            sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(cpu_clock() - cpu_start)
    return times, cpu_times


def peak_bytes(step, device):
    """Peak bytes allocated above the start while ``step()`` runs: the CUDA allocator's peak, or the
    CPU profiler's allocation events replayed (:func:`pncc_cuda.testing.peak_cpu_bytes`)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return peak_cpu_bytes(step)


def random_qkv(B, Nq, Nk, C, Cv, dtype=torch.float32, device="cpu", scale=1.0, seed=0):
    """Seeded standard-normal query (B, Nq, C), key (B, Nk, C) and value (B, Nk, Cv), drawn in float64."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Nq, C, generator=g, dtype=torch.float64) * scale
    k = torch.randn(B, Nk, C, generator=g, dtype=torch.float64) * scale
    v = torch.randn(B, Nk, Cv, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


if __name__ == "__main__":
    print(describe())
