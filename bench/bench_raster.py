"""Rasterizer benchmark: render_pncc on real face meshes at 256x256.

Rows, measured in one run so that ratios are meaningful:
  - render_pncc on the CPU with 1 thread and with every thread;
  - the unfused path a user could compose from our own ops (rasterize + interpolate + permute);
  - the pure-PyTorch reference (pncc_cuda.reference), the baseline every ratio is taken to;
  - render_pncc on CUDA, when a GPU is visible.

Run as a script for the markdown table, JSON (bench/out/raster.json) and a plot
(bench/out/raster.png):
    python bench/bench_raster.py [--smoke] [--repeats N]
or through pytest-benchmark:
    python -m pytest bench/bench_raster.py --benchmark-only
"""
import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if any((ROOT / "pncc_cuda").glob("_C*.so")):
    sys.path[:0] = [str(ROOT), str(ROOT / "python")]

import pncc_cuda  # noqa: E402
from pncc_cuda import reference  # noqa: E402
from pncc_cuda.testing import face_mesh  # noqa: E402

SIZE = 256
MESHES = (76073, 105840)
BATCHES = (1, 32)
CUDA_BATCHES = (1, 32, 256)  # the CUDA target is stated at batch 256


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unfused(vertices, faces, ncc, height, width):
    face_index, bary, _ = pncc_cuda.rasterize(vertices, faces, height, width)
    pncc = pncc_cuda.interpolate(ncc.unsqueeze(0), faces, face_index, bary).permute(0, 3, 1, 2)
    return pncc.contiguous(), (face_index >= 0).unsqueeze(1)


def candidates(device, all_threads):
    """(row name, function, thread count or None) for one device."""
    if device == "cpu":
        return [
            ("render_pncc (CPU, 1 thread)", pncc_cuda.render_pncc, 1),
            (f"render_pncc (CPU, {all_threads} threads)", pncc_cuda.render_pncc, all_threads),
            (f"rasterize+interpolate, unfused (CPU, {all_threads} threads)", unfused, all_threads),
            (f"reference, PyTorch (CPU, {all_threads} threads)", reference.render_pncc_reference, all_threads),
        ]
    return [
        ("render_pncc (CUDA)", pncc_cuda.render_pncc, None),
        ("rasterize+interpolate, unfused (CUDA)", unfused, None),
        ("reference, PyTorch (CUDA)", reference.render_pncc_reference, None),
    ]


def peak_memory_ratio(vertices, faces, ncc):
    """CUDA peak memory of one render_pncc call over the bytes of its outputs plus the 8-byte
    z-buffer key per pixel (the design's bound; 1.0 means nothing else was allocated)."""
    batch = vertices.shape[0]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = pncc_cuda.render_pncc(vertices, faces, ncc, SIZE, SIZE)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    bound = batch * SIZE * SIZE * (4 * vertices.element_size() + 8)
    del out
    return peak / bound


def run(meshes=MESHES, batches=BATCHES, repeats=15, devices=None, cuda_batches=CUDA_BATCHES):
    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    all_threads = torch.get_num_threads()
    rows = []
    for num_faces in meshes:
        mesh = face_mesh(num_faces, size=SIZE)
        for device in devices:
            faces, ncc = mesh.faces.to(device), mesh.ncc.to(device)
            for batch in batches if device == "cpu" else cuda_batches:
                vertices = mesh.batch(batch).to(device)
                group = []
                for name, fn, threads in candidates(device, all_threads):
                    if threads:
                        torch.set_num_threads(threads)
                    is_reference = fn is reference.render_pncc_reference
                    n = max(3, repeats // 3) if is_reference else repeats
                    seconds = median_seconds(lambda: fn(vertices, faces, ncc, SIZE, SIZE), device, n)
                    group.append(
                        {
                            "mesh": mesh.source,
                            "triangles": num_faces,
                            "batch": batch,
                            "device": device,
                            "row": name,
                            "ms_per_image": 1e3 * seconds / batch,
                            "images_per_s": batch / seconds,
                            "is_reference": is_reference,
                        }
                    )
                    if device == "cuda" and fn is pncc_cuda.render_pncc:
                        group[-1]["peak_memory_vs_outputs_plus_zbuffer"] = peak_memory_ratio(
                            vertices, faces, ncc)
                torch.set_num_threads(all_threads)
                ref = next(r for r in group if r["is_reference"])
                for r in group:
                    r["speedup_vs_reference"] = ref["ms_per_image"] / r["ms_per_image"]
                rows += group
    return rows


def markdown(rows):
    lines = [
        "| mesh | triangles | batch | row | ms / image | images / s | x reference | peak mem / bound |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        memory = r.get("peak_memory_vs_outputs_plus_zbuffer")
        lines.append(
            f"| {r['mesh']} | {r['triangles']} | {r['batch']} | {r['row']} | "
            f"{r['ms_per_image']:.3f} | {r['images_per_s']:.0f} | {r['speedup_vs_reference']:.1f} | "
            f"{'-' if memory is None else f'{memory:.2f}'} |"
        )
    return "\n".join(lines)


def machine():
    info = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['triangles'] // 1000}k B={r['batch']}\n{r['row']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1))
    ax.barh(range(len(rows)), [r["images_per_s"] for r in rows], color=[
        "tab:gray" if r["is_reference"] else "tab:blue" for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("images / s (log scale), 256x256 PNCC")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def export_mesh(mesh, path):
    """int32 V, int32 F, float32 vertices (V, 3), int32 faces (F, 3): bench_raster_core's input."""
    import numpy as np

    with open(path, "wb") as f:
        np.array(mesh.vertices.shape[:1] + mesh.faces.shape[:1], dtype=np.int32).tofile(f)
        mesh.vertices.numpy().astype(np.float32).tofile(f)
        mesh.faces.numpy().astype(np.int32).tofile(f)
    print(f"wrote {path}: {mesh.source}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one mesh, batch 1, few repeats (CI)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "out")
    parser.add_argument("--devices", nargs="+", choices=("cpu", "cuda"),
                        help="default: cpu, plus cuda when a CUDA device is visible")
    parser.add_argument("--batches", type=int, nargs="+",
                        help=f"batch sizes (default: {BATCHES} on the CPU, {CUDA_BATCHES} on CUDA)")
    parser.add_argument("--meshes", type=int, nargs="+", choices=MESHES, help="triangle counts")
    parser.add_argument("--export-mesh", type=pathlib.Path, metavar="PATH",
                        help="write the 76,073-triangle workload for build/cpp/bench_raster_core and exit")
    args = parser.parse_args(argv)
    if args.export_mesh:
        export_mesh(face_mesh(76073, size=SIZE), args.export_mesh)
        return []
    if args.smoke:
        rows = run(meshes=(76073,), batches=(1,), repeats=3)
    else:
        rows = run(meshes=args.meshes or MESHES, batches=args.batches or BATCHES,
                   repeats=args.repeats, devices=args.devices,
                   cuda_batches=args.batches or CUDA_BATCHES)
    print(markdown(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "raster.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    try:
        plot(rows, args.out / "raster.png")
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
    return rows


# ---- pytest-benchmark entry points ----

BENCH_CASES = pytest.mark.parametrize("num_faces, batch", [(f, b) for f in MESHES for b in BATCHES])


def _bench_case(benchmark, device, threads, num_faces, batch):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; none is visible")
    mesh = face_mesh(num_faces, size=SIZE)
    vertices = mesh.batch(batch).to(device)
    faces, ncc = mesh.faces.to(device), mesh.ncc.to(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:

        def once():
            out = pncc_cuda.render_pncc(vertices, faces, ncc, SIZE, SIZE)
            synchronize(device)
            return out

        benchmark.extra_info.update(triangles=num_faces, batch=batch, device=device, source=mesh.source)
        benchmark(once)
    finally:
        torch.set_num_threads(previous)


@BENCH_CASES
def test_render_pncc_cpu_one_thread(benchmark, num_faces, batch):
    _bench_case(benchmark, "cpu", 1, num_faces, batch)


@BENCH_CASES
def test_render_pncc_cpu_all_threads(benchmark, num_faces, batch):
    _bench_case(benchmark, "cpu", None, num_faces, batch)


@BENCH_CASES
def test_render_pncc_cuda(benchmark, num_faces, batch):
    _bench_case(benchmark, "cuda", None, num_faces, batch)


if __name__ == "__main__":
    main()
