"""Static performance report of every CUDA kernel, from its SASS: no GPU needed.

    python bench/sass_report.py [--arch 80 90] [--roofline] [--json FILE]

For sm_80 and sm_90 it prints, per kernel: registers, spills (local-memory stores and loads in the
SASS, and the stack frame), static and dynamic shared memory per block, the theoretical occupancy
in warps per SM on an H100 and an A100, and the counts of HMMA, LDSM, LDGSTS (cp.async),
LDG.E.128 (16-byte global loads), generic LD.E loads and FFMA (the SIMT kernel's fp32 FMAs), both
in the whole kernel and inside its loops (instructions between a backward branch and its target:
the main loop and any other).

The cubins come from the build when it is current (pncc_cuda/_C*.so, compiled with
FORCE_CUDA=1 for both architectures), otherwise from nvcc -fatbin on csrc/**/*_cuda.cu, cached
under build/sass_report/ by a hash of the sources. Needs nvcc (CUDA_HOME or /usr/local/cuda) only
for the second, and cuobjdump (the toolkit's, or the copy triton ships).

Block size and dynamic shared memory are launch parameters, not properties of the cubin: they
come from LAUNCH_CONFIG below, one entry per kernel family, at the benchmark shape (bf16, B=16,
N=4096, C=256, Cv=258). A kernel missing from it is reported with '?' and no occupancy.
"""
import argparse
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE = REPO / "build" / "sass_report"

# ---- published per-SM limits (CUDA C++ Programming Guide, compute capability 8.0 and 9.0) ----
GPUS = {
    # name: (arch, SMs, registers/SM, shared memory/SM usable by blocks, max warps/SM,
    #        max blocks/SM, dense bf16 tensor TFLOP/s, HBM TB/s, boost clock GHz)
    "H100": (90, 132, 65536, 228 * 1024, 64, 32, 989.4, 3.35, 1.83),
    "A100": (80, 108, 65536, 164 * 1024, 64, 32, 312.0, 2.04, 1.41),
}
FP32_LANES_PER_SM = {"H100": 128, "A100": 64}  # FFMA lanes: one warp FFMA per cycle per sub-partition on sm_90, one per 2 on sm_80
SMEM_RESERVED_PER_BLOCK = 1024  # the runtime keeps 1 KiB per block on sm_80+
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256

# ---- benchmark shape of the roofline estimate (issue 10) ----
BENCH = dict(B=16, N=4096, C=256, Cv=258, elem=2)


def _simt_smem(nb):
    """SimtSmem<NB>::kBytes of the register-tiled SIMT kernel (csrc/corr/corr_kernels.cuh): region 0
    (the two k-major score chunks, 2 x 32 x 68 floats, or the X chunk, 32 x (32 NB + 4)) and P^T
    (64 x 68 floats)."""
    region0 = max(2 * 32 * 68, 32 * (32 * nb + 4))
    return (region0 + 64 * 68) * 4


_B, _N, _C, _CV = BENCH["B"], BENCH["N"], BENCH["C"], BENCH["Cv"]


def _smem_stride(width):
    """corr_kernels.cuh's smem_stride: rows padded to 16 elements, plus 8 (bank groups)."""
    return -(-width // 16) * 16 + 8


def _flash_forward_smem(C, Cv, elem=2):
    """FlashForwardSmem<NT>::bytes: Q and K tiles of 64 rows, one V tile of the 8 * NT window."""
    nt = next(n for n in (2, 4, 8, 16, 33) if 8 * n >= Cv)
    return ((64 + 64) * _smem_stride(-(-C // 16) * 16) + 64 * _smem_stride(8 * nt)) * elem


def _smem_optin(arch):
    """The opt-in maximum of dynamic shared memory per block, which launchers that size their
    buffers to the device read: the SM's usable shared memory less the runtime's 1 KiB per block
    (H100 227 KiB, A100 163 KiB)."""
    smem_sm = next(spec[3] for spec in GPUS.values() if spec[0] == arch)
    return smem_sm - SMEM_RESERVED_PER_BLOCK


def _flash_backward_smem(C, Cv, elem=2, arch=90):
    """FlashBackwardSmem<NTK, NTV>::bytes at the launcher's q_stages: K, Q, V, dO and dS^T tiles,
    3 fp32 per query row, and a second Q buffer where it fits the device (the H100 at C = 256)."""
    ldqk, ldv = _smem_stride(8 * (8 if C <= 64 else 32)), _smem_stride(8 * (4 if Cv <= 32 else 33))
    one_stage = (2 * 64 * ldqk + 2 * 64 * ldv + 64 * (64 + 8)) * elem + 3 * 64 * 4
    two_stages = one_stage + 64 * ldqk * elem
    return two_stages if two_stages <= _smem_optin(arch) else one_stage


def _flash_dq_smem(C, Cv, elem=2):
    """launch_flash_dq_shape: Q, K, dO and V tiles of the backward's strides."""
    ldqk, ldv = _smem_stride(8 * (8 if C <= 64 else 32)), _smem_stride(8 * (4 if Cv <= 32 else 33))
    return 2 * 64 * (ldqk + ldv) * elem
# kernel-name pattern -> (threads per block, dynamic shared memory bytes at the benchmark shape (or a
# function of the arch, for launchers that size to the device), matrix-product FLOPs of one launch
# at the benchmark shape or None). First match wins.
# Keep in step with the launchers: a new kernel needs an entry here (its test fails until then).
LAUNCH_CONFIG = [
    # The register-tiled SIMT kernel (Mode 0..4 = fwd, D, dq, dk, dv; the last template argument
    # NB: output windows of 32 NB channels, 9 at the benchmark shape, 2 for outputs <= 64 and kD).
    (r"corr_simt_kernel<.*Mode\)1, 2>", 256, _simt_smem(2), 2 * _B * _N * _N * (_C + _CV)),
    (r"corr_simt_kernel<.*, 2>", 256, _simt_smem(2), None),
    (r"corr_simt_kernel<.*Mode\)0, 9>", 256, _simt_smem(9), 2 * _B * _N * _N * (_C + _CV)),
    (r"corr_simt_kernel<.*Mode\)[23], 9>", 256, _simt_smem(9), 2 * _B * _N * _N * (2 * _C + _CV)),
    (r"corr_simt_kernel<.*Mode\)4, 9>", 256, _simt_smem(9), 2 * _B * _N * _N * (_C + _CV)),
    # The FlashAttention-2 style bf16/fp16 kernels (csrc/corr/corr_kernels.cuh), at C = 256 and
    # Cv = 258: the forward's window of 8 * 33 = 264 value channels, the backward's (NTK, NTV) =
    # (32, 33) tiles. Shared memory from FlashForwardSmem / FlashBackwardSmem / launch_flash_dq_shape.
    (r"corr_flash_forward_kernel<", 128, _flash_forward_smem(_C, _CV),
     2 * _B * _N * _N * (_C + _CV)),
    (r"corr_flash_backward_kernel<", 256, lambda arch: _flash_backward_smem(_C, _CV, arch=arch),
     2 * _B * _N * _N * (3 * _C + 2 * _CV)),  # S, dP, dV, dK, dQ (the recomputed S not counted)
    (r"corr_flash_dq_kernel<", 128, _flash_dq_smem(_C, _CV), 2 * _B * _N * _N * (2 * _C + _CV)),
    (r"corr_backward_d_kernel", 256, 0, None),
    (r"corr_normalize(_backward)?_kernel", 256, 0, None),
    # The rasterizer: 256 threads, no shared memory.
    (r"(zbuffer|resolve_raster|resolve_pncc|rasterize_backward|interpolate|interpolate_backward)_kernel",
     256, 0, None),
]

OPCODES = {
    "HMMA": lambda op: op.startswith("HMMA"),
    "LDSM": lambda op: op.startswith("LDSM"),
    "LDGSTS": lambda op: op.startswith("LDGSTS"),
    "LDG.128": lambda op: op.startswith("LDG") and ".128" in op,
    "LD.E": lambda op: op == "LD" or op.startswith("LD."),  # generic-address loads
    "FFMA": lambda op: op.startswith("FFMA"),
}
SPILL = lambda op: op.startswith("STL") or op.startswith("LDL")  # noqa: E731


@dataclasses.dataclass
class Kernel:
    arch: int
    mangled: str
    name: str
    source: str = None  # the .cu file it was compiled from
    regs: int = 0
    stack: int = 0
    static_smem: int = 0
    spill_instructions: int = 0
    counts: dict = dataclasses.field(default_factory=dict)
    loop_counts: dict = dataclasses.field(default_factory=dict)
    loop_instructions: int = 0
    threads: int = None
    dynamic_smem: int = None
    flops: int = None
    occupancy: dict = dataclasses.field(default_factory=dict)  # GPU -> warps/SM

    @property
    def spills(self):
        return self.spill_instructions > 0 or self.stack > 0


# ---- tools ----
def find_tool(name):
    candidates = [os.environ.get("CUDA_HOME", "/usr/local/cuda") + f"/bin/{name}", shutil.which(name)]
    try:  # triton ships cuobjdump and nvdisasm
        import triton

        candidates.append(str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.exists(c) and os.access(c, os.X_OK):
            return c
    return None


def demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return list(names)
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout
    return out.splitlines()


def _strip_namespaces(name):
    # Drop the namespaces of the kernel itself (before its template argument list).
    lt = name.find("<")
    base, args = (name, "") if lt < 0 else (name[:lt], name[lt:])
    return base.split("::")[-1] + args


# ---- cubins ----
def sources():
    return sorted(glob.glob(str(REPO / "csrc" / "**" / "*_cuda.cu"), recursive=True))


def source_hash(source, extra):
    """Hash of one .cu file, the headers it can include (its own folder's and csrc/common's) and
    the compiler flags."""
    h = hashlib.sha256(extra.encode())
    h.update(pathlib.Path(source).read_bytes())
    folders = {pathlib.Path(source).parent, REPO / "csrc" / "common"}
    for path in sorted(p for d in folders for p in glob.glob(str(d / "*"))):
        if os.path.isfile(path) and path.endswith((".cuh", ".h")):
            h.update(path.encode())
            h.update(pathlib.Path(path).read_bytes())
    return h.hexdigest()[:16]


def built_library(archs, cuobjdump):
    """The extension of this checkout, if it holds cubins for every arch and is newer than every
    CUDA source."""
    libs = sorted(glob.glob(str(REPO / "pncc_cuda" / "_C*.so")))
    if not libs:
        return None
    lib = libs[0]
    newest = max(os.path.getmtime(p) for p in glob.glob(str(REPO / "csrc" / "**" / "*"), recursive=True)
                 if os.path.isfile(p))
    if os.path.getmtime(lib) < newest:
        return None
    listing = subprocess.run([cuobjdump, "-lelf", lib], capture_output=True, text=True).stdout
    if all(f"sm_{a}" in listing for a in archs):
        return lib
    return None


def compile_fatbins(archs, nvcc):
    import torch
    from torch.utils import cpp_extension

    flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++20",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
             f"-I{REPO / 'csrc'}"]
    for inc in cpp_extension.include_paths():
        flags += ["-isystem", inc]
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    CACHE.mkdir(parents=True, exist_ok=True)
    fatbins = []
    for src in sources():
        key = source_hash(src, " ".join(flags) + version + torch.__version__)
        dst = CACHE / f"{pathlib.Path(src).stem}-{key}.fatbin"
        if not dst.exists():
            print(f"nvcc {pathlib.Path(src).relative_to(REPO)} (sm_{', sm_'.join(map(str, archs))})",
                  file=sys.stderr, flush=True)
            tmp = dst.with_suffix(f".{os.getpid()}.tmp")
            subprocess.run([nvcc, "-fatbin", *flags, "-o", str(tmp), src], check=True)
            tmp.rename(dst)
        fatbins.append(str(dst))
    return fatbins


# ---- parsing ----
ARCH_LINE = re.compile(r"^arch = sm_(\d+)")
IDENTIFIER = re.compile(r"^identifier = (\S+)")
FUNCTION_SASS = re.compile(r"^\s+Function : (\S+)")
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
FUNCTION_RES = re.compile(r"^\s*Function (\S+):")
RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_sass(text):
    """({(arch, mangled): [(pc, opcode, operands)]}, {(arch, mangled): source file})"""
    kernels, origin, arch, source, current = {}, {}, None, None, None
    for line in text.splitlines():
        m = ARCH_LINE.match(line)
        if m:
            arch = int(m.group(1))
            continue
        m = IDENTIFIER.match(line)
        if m:
            source = m.group(1)
            continue
        m = FUNCTION_SASS.match(line)
        if m:
            current = kernels.setdefault((arch, m.group(1)), [])
            origin[(arch, m.group(1))] = source
            continue
        m = INSTRUCTION.search(line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return kernels, origin


def parse_resources(text):
    res, arch, current = {}, None, None
    for line in text.splitlines():
        m = ARCH_LINE.match(line)
        if m:
            arch = int(m.group(1))
            continue
        m = FUNCTION_RES.match(line)
        if m:
            current = m.group(1)
            continue
        m = RESOURCES.search(line)
        if m and current:
            res[(arch, current)] = tuple(int(x) for x in m.groups())
            current = None
    return res


def loop_ranges(instructions):
    """[start, end] pc ranges of the loops: each backward branch and the target it jumps to."""
    ranges = []
    for pc, op, operands in instructions:
        if op.startswith("BRA") or op.startswith("JMP"):
            t = BRANCH_TARGET.search(operands)
            if t and int(t.group(1), 16) <= pc:
                ranges.append((int(t.group(1), 16), pc))
    return ranges


def count(instructions, pcs=None):
    counts = {k: 0 for k in OPCODES}
    for pc, op, _ in instructions:
        if pcs is not None and pc not in pcs:
            continue
        for k, match in OPCODES.items():
            if match(op):
                counts[k] += 1
    return counts


# ---- occupancy ----
def occupancy(k, gpu):
    arch, sms, regs_sm, smem_sm, warps_sm, blocks_sm = GPUS[gpu][:6]
    if k.threads is None or k.dynamic_smem is None:
        return None
    warps = -(-k.threads // 32)
    by_warps = warps_sm // warps
    regs_per_warp = -(-max(k.regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (regs_sm // regs_per_warp) // warps
    smem = k.static_smem + k.dynamic_smem
    by_smem = smem_sm // (smem + SMEM_RESERVED_PER_BLOCK) if smem else blocks_sm
    blocks = min(blocks_sm, by_warps, by_regs, by_smem)
    return blocks * warps


def launch_config(name, arch):
    for pattern, threads, smem, flops in LAUNCH_CONFIG:
        if re.search(pattern, name):
            return threads, smem(arch) if callable(smem) else smem, flops
    return None, None, None


def analyse(archs=(80, 90)):
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        raise SystemExit("sass_report: cuobjdump not found (CUDA toolkit or triton)")
    lib = built_library(archs, cuobjdump)
    if lib:
        binaries = [lib]
    else:
        nvcc = find_tool("nvcc")
        if nvcc is None:
            raise SystemExit("sass_report: no current CUDA build and no nvcc to compile one")
        binaries = compile_fatbins(archs, nvcc)
    sass, origin, res = {}, {}, {}
    for b in binaries:
        code, where = parse_sass(subprocess.run([cuobjdump, "-sass", b], capture_output=True,
                                                text=True, check=True).stdout)
        sass.update(code)
        origin.update(where)
        res.update(parse_resources(subprocess.run([cuobjdump, "-res-usage", b], capture_output=True,
                                                  text=True, check=True).stdout))
    keys = sorted(k for k in sass if k[0] in archs)
    names = demangle([m for _, m in keys])
    kernels = []
    for (arch, mangled), demangled in zip(keys, names):
        instr = sass[(arch, mangled)]
        k = Kernel(arch=arch, mangled=mangled, name=_strip_namespaces(kernel_name(demangled)),
                   source=origin.get((arch, mangled)))
        regs, stack, shared, local = res.get((arch, mangled), (0, 0, 0, 0))
        k.regs, k.stack, k.static_smem = regs, stack, shared
        k.spill_instructions = sum(1 for _, op, _ in instr if SPILL(op))
        k.counts = count(instr)
        pcs = set()
        for lo, hi in loop_ranges(instr):
            pcs.update(pc for pc, _, _ in instr if lo <= pc <= hi)
        k.loop_counts = count(instr, pcs)
        k.loop_instructions = len(pcs)
        k.threads, k.dynamic_smem, k.flops = launch_config(k.name, arch)
        for gpu, spec in GPUS.items():
            k.occupancy[gpu] = occupancy(k, gpu) if spec[0] == arch else None
        kernels.append(k)
    return kernels


def kernel_name(demangled):
    """`void pncc::corr::(anonymous namespace)::corr_simt_kernel<float, (pncc::corr::
    (anonymous namespace)::Mode)0, 9>(...)` -> `corr_simt_kernel<float, (Mode)0, 9>`."""
    name = re.sub(r"\(anonymous namespace\)::", "", demangled)
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\b(?:\w+::)+(\w+)\)", r"\1)", name)  # (pncc::corr::Mode)0 -> (Mode)0
    depth = 0
    for i, ch in enumerate(name):  # cut at the parameter list
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and i > 0 and name[i - 1] not in "<, ":
            return name[:i]
    return name


# ---- roofline ----
def roofline(k):
    """Lower-bound time estimate (ms) of one launch at the benchmark shape on the GPU of k.arch:
    the largest of the arithmetic time at the published peak, issue time and HBM time for reading
    the inputs once. Tensor-core kernels: HMMA time at the dense bf16 peak, and instructions per
    HMMA in the loops x HMMAs needed, 4 warp-instructions per cycle per SM. The fp32 SIMT kernel
    (no HMMA): FFMA time at the SM's fp32 lanes, and instructions per FFMA in the loops x FFMAs
    needed (64 FLOP each). An estimate from static counts, not a measurement."""
    gpu = next(g for g, s in GPUS.items() if s[0] == k.arch)
    _, sms, _, _, _, _, tflops, tbps, ghz = GPUS[gpu]
    if not k.flops:
        return None
    b = BENCH
    if k.loop_counts.get("HMMA"):
        unit, per_unit_flop = "HMMA", 16 * 8 * 16 * 2
        t_math = k.flops / (tflops * 1e12)
        elem = b["elem"]
    elif k.loop_counts.get("FFMA"):
        unit, per_unit_flop = "FFMA", 2 * 32
        t_math = k.flops / (sms * FP32_LANES_PER_SM[gpu] * 2 * ghz * 1e9)
        elem = 4
    else:
        return None
    per_unit = k.loop_instructions / k.loop_counts[unit]
    t_issue = k.flops / per_unit_flop * per_unit / (sms * 4 * ghz * 1e9)
    t_mem = b["B"] * b["N"] * (2 * b["C"] + b["Cv"]) * elem / (tbps * 1e12)
    t = max(t_math, t_issue, t_mem)
    bound = {t_math: "tensor" if unit == "HMMA" else "fp32", t_issue: "issue", t_mem: "memory"}[t]
    return dict(gpu=gpu, ms=t * 1e3, tflops=k.flops / t / 1e12, bound=bound, unit=unit,
                instructions_per_unit=per_unit)


def fmt(v):
    return "?" if v is None else str(v)


def print_report(kernels, with_roofline):
    header = ("| arch | kernel | regs | spills (STL/LDL, stack B) | smem static+dynamic B | "
              "warps/SM H100 | warps/SM A100 | HMMA | LDSM | LDGSTS | LDG.128 | LD.E | FFMA | "
              "in loops: HMMA / LDSM / LDGSTS / LDG.128 / LD.E / FFMA |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for k in kernels:
        c, lc = k.counts, k.loop_counts
        print(f"| sm_{k.arch} | `{k.name}` | {k.regs} | {k.spill_instructions}, {k.stack} | "
              f"{k.static_smem}+{fmt(k.dynamic_smem)} | {fmt(k.occupancy.get('H100'))} | "
              f"{fmt(k.occupancy.get('A100'))} | {c['HMMA']} | {c['LDSM']} | {c['LDGSTS']} | "
              f"{c['LDG.128']} | {c['LD.E']} | {c['FFMA']} | {lc['HMMA']} / {lc['LDSM']} / "
              f"{lc['LDGSTS']} / {lc['LDG.128']} / {lc['LD.E']} / {lc['FFMA']} |")
    if with_roofline:
        print()
        print("Roofline ESTIMATE at B=16, N=4096, C=256, Cv=258 (bf16 tensor-core kernels, fp32 "
              "SIMT kernel), from static instruction counts and published peaks; not a measurement:")
        print()
        print("| GPU | kernel | matrix FLOPs | instructions per HMMA/FFMA in loops | estimated ms | "
              "estimated TFLOP/s | bound |")
        print("|---|---|---|---|---|---|---|")
        for k in kernels:
            r = roofline(k) if "bfloat16" in k.name or k.name.startswith("corr_simt_kernel<float") else None
            if r:
                print(f"| {r['gpu']} | `{k.name}` | {k.flops:.3g} | {r['instructions_per_unit']:.1f} "
                      f"{r['unit']} | {r['ms']:.3f} | {r['tflops']:.1f} | {r['bound']} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--roofline", action="store_true", help="add the roofline estimate")
    parser.add_argument("--filter", default="", help="only kernels whose name matches this regex")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args()
    kernels = [k for k in analyse(tuple(args.arch)) if re.search(args.filter, k.name)]
    print_report(kernels, args.roofline)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps([dataclasses.asdict(k) for k in kernels], indent=1))


if __name__ == "__main__":
    main()
