"""Static properties of the tensor-core corr_warp kernels, read from their SASS (issue 10).

bench/sass_report.py compiles (or reuses the build's) sm_80 and sm_90 code of every kernel; this
test asserts, for each bf16 and fp16 corr kernel that issues HMMA: no register spills, ldmatrix
(LDSM) and cp.async (LDGSTS) present, no generic-address LD.E loads, and on sm_90 a theoretical
occupancy of at least 8 warps per SM on an H100. Skips without cuobjdump, or without both a
current CUDA build and nvcc. The assertions hold the FlashAttention-2 style kernels
(corr_flash_*). The register-tiled SIMT kernel (corr_simt_kernel: the fp32 path, and the
bf16/fp16 fallback for C > 256 or a forward over the shared-memory limit) has its own: no spills,
fp32 FMAs in its loops and no HMMA at all (never TF32), and at least 8 warps per SM on an H100.
"""
import pathlib
import re
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import sass_report  # noqa: E402

FLASH_KERNEL = re.compile(r"^corr_flash_")
MIN_WARPS_PER_SM_H100 = 8
# Held to everything but the occupancy bound, with the reason: off the default path.
OCCUPANCY_EXEMPT = {
    "corr_flash_dq_kernel<": "the deterministic dQ pass runs only under "
                             "torch.use_deterministic_algorithms(True) (136 KiB: one block of 4 warps)",
}


@pytest.fixture(scope="module")
def report():
    if sass_report.find_tool("cuobjdump") is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton's copy)")
    if sass_report.built_library((80, 90), sass_report.find_tool("cuobjdump")) is None and \
            sass_report.find_tool("nvcc") is None:
        pytest.skip("no current CUDA build (FORCE_CUDA=1) and no nvcc to compile the kernels")
    return sass_report.analyse((80, 90))


def problems_of(k):
    found = []
    if k.spills:
        found.append(f"spills ({k.spill_instructions} STL/LDL, {k.stack} B stack)")
    if not k.counts["LDSM"]:
        found.append("no ldmatrix (LDSM)")
    if not k.counts["LDGSTS"]:
        found.append("no cp.async (LDGSTS)")
    if k.counts["LD.E"]:
        found.append(f"{k.counts['LD.E']} generic-address LD.E loads")
    if k.arch == 90 and not any(k.name.startswith(n) for n in OCCUPANCY_EXEMPT):
        warps = k.occupancy.get("H100")
        if warps is None:
            found.append("no launch configuration in bench/sass_report.py LAUNCH_CONFIG")
        elif warps < MIN_WARPS_PER_SM_H100:
            found.append(f"{warps} warps/SM on H100 (< {MIN_WARPS_PER_SM_H100})")
    return found


def tensor_core_corr_kernels(report, arch, dtype, pattern):
    return [k for k in report if k.arch == arch and "/corr/" in (k.source or "")
            and f"<{dtype}" in k.name and k.counts["HMMA"] > 0 and pattern.match(k.name)]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["__nv_bfloat16", "__half"])
def test_flash_corr_kernels(report, arch, dtype):
    kernels = tensor_core_corr_kernels(report, arch, dtype, FLASH_KERNEL)
    names = {k.name.split("<")[0] for k in kernels}
    assert {"corr_flash_forward_kernel", "corr_flash_backward_kernel"} <= names, sorted(names)
    failures = {k.name: problems_of(k) for k in kernels}
    failures = {name: p for name, p in failures.items() if p}
    assert not failures, "\n".join(f"sm_{arch} {n}: {', '.join(p)}" for n, p in failures.items())


def test_report_reads_the_sass(report):
    """The parser sees what is there: every kernel has registers, the bf16 corr kernels HMMA."""
    assert all(k.regs > 0 for k in report)
    names = {k.name for k in report}
    assert any(n.startswith("zbuffer_kernel<") for n in names), sorted(names)[:10]
    for arch in (80, 90):
        assert any(k.arch == arch and k.counts["HMMA"] > 0 and "bfloat16" in k.name for k in report)


@pytest.mark.parametrize("arch", [80, 90])
def test_simt_corr_kernel(report, arch):
    kernels = [k for k in report if k.arch == arch and k.name.startswith("corr_simt_kernel<")]
    assert {k.name.split(",")[0] for k in kernels} >= {"corr_simt_kernel<float"}, sorted(
        k.name for k in kernels)
    failures = {}
    for k in kernels:
        found = []
        if k.spills:
            found.append(f"spills ({k.spill_instructions} STL/LDL, {k.stack} B stack)")
        if not k.loop_counts["FFMA"]:
            found.append("no FFMA in its loops")
        if k.counts["HMMA"]:
            found.append(f"{k.counts['HMMA']} HMMA (tensor cores: TF32 or 16-bit products)")
        if arch == 90:
            warps = k.occupancy.get("H100")
            if warps is None or warps < MIN_WARPS_PER_SM_H100:
                found.append(f"{warps} warps/SM on H100 (< {MIN_WARPS_PER_SM_H100})")
        if found:
            failures[k.name] = found
    assert not failures, "\n".join(f"sm_{arch} {n}: {', '.join(p)}" for n, p in failures.items())
