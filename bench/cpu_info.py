"""The CPU a benchmark ran on, for every table header: `lscpu`'s model name and the flags that
decide which kernels run (AVX2, AVX-512, AVX512-BF16, AMX), plus torch's thread count.

Results measured on one CPU family say little about another (bench/RESULTS.md: MKL runs its AVX2
code on AMD and its AVX-512 code on Intel), so no table leaves this out.
"""
import platform
import re
import subprocess

import torch

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


def cpu_model():
    """`lscpu`'s model name (or /proc/cpuinfo's, or platform's answer)."""
    for text, key in ((_lscpu(), "Model name"), (_cpuinfo(), "model name")):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
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


if __name__ == "__main__":
    print(describe())
