"""Rasterizer benchmark: render_pncc on real face meshes at 256x256.

Rows, measured in one run so that ratios are meaningful, timed in interleaved rounds within each
thread count (every row of a group runs with the same number of threads, and a burst of load on a
shared machine hits all of them alike). Wall and CPU time are both reported; the single-thread
ratios use the thread's CPU time, which a busy neighbour does not stretch:
  - 1 thread: render_pncc; the classic per-triangle z-buffer loop in C++ the way 3DDFA_V2's Sim3DR
    renders (bench/cpp/classic_zbuffer.cpp, compiled with -O2 here), the baseline users would pick
    instead and the one the "x classic loop" column is taken to; the pure-PyTorch reference;
  - every thread: render_pncc; the unfused path a user could compose from our own ops
    (rasterize + interpolate + permute); the reference;
  - 1 thread, back to back: render_pncc and the classic loop again, each called repeatedly (warm
    caches, as in a loop rendering one image after another; the interleaved rows start every call
    with caches the other rows filled);
  - render_pncc on CUDA, when a GPU is visible.
Then the CPU rasterizer's time split (cull, cover, resolve) and triangle-rejection rate for every
culling variant this CPU supports (bench/cpp/raster_split.cpp, one thread, one image).

Run as a script for the markdown table, JSON (bench/out/raster.json) and a plot
(bench/out/raster.png):
    python bench/bench_raster.py [--smoke] [--repeats N]
or through pytest-benchmark:
    python -m pytest bench/bench_raster.py --benchmark-only
"""
import argparse
import ctypes
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if any((ROOT / "pncc_cuda").glob("_C*.so")):
    sys.path[:0] = [str(ROOT), str(ROOT / "python")]
sys.path.insert(0, str(ROOT / "bench"))

import pncc_cuda  # noqa: E402
from _common import interleaved_times, machine as machine_facts, sync  # noqa: E402
from pncc_cuda import reference  # noqa: E402
from pncc_cuda.testing import face_mesh  # noqa: E402

SIZE = 256
MESHES = (76073, 105840)
BATCHES = (1, 32)
CUDA_BATCHES = (1, 32, 256)  # the CUDA target is stated at batch 256
CLASSIC = "classic loop, C++ -O2 (Sim3DR style)"
# The extension's own compiler flags (setup.py), for the time split of its rasterizer.
EXTENSION_FLAGS = ["-O3", "-ffp-contract=off", "-std=c++17"]


def build_native(out_dir):
    """Compiles the classic loop (-O2) and the time-split probe (the extension's flags) into
    shared libraries -> (classic, split) ctypes handles, or (None, None) without a C++ compiler."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        print("no C++ compiler found: the classic-loop rows and the time split are skipped",
              file=sys.stderr)
        return None, None
    out_dir.mkdir(parents=True, exist_ok=True)
    builds = {
        "classic": (["-O2"], [ROOT / "bench/cpp/classic_zbuffer.cpp"]),
        "split": (EXTENSION_FLAGS, [ROOT / "bench/cpp/raster_split.cpp",
                                    ROOT / "csrc/raster/raster_cull.cpp"]),
    }
    libs = []
    for name, (flags, sources) in builds.items():
        target = out_dir / f"libbench_{name}.so"
        subprocess.run([compiler, *flags, "-shared", "-fPIC", f"-I{ROOT / 'csrc'}",
                        *map(str, sources), "-o", str(target)], check=True)
        libs.append(ctypes.CDLL(str(target)))
    classic, split = libs
    pointer = ctypes.c_void_p
    classic.classic_render.argtypes = [pointer, pointer, ctypes.c_int, pointer, ctypes.c_int,
                                       ctypes.c_int, pointer, pointer]
    split.raster_split.argtypes = [pointer, ctypes.c_int, pointer, ctypes.c_int, pointer,
                                   ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                   pointer]
    return classic, split


def classic_renderer(lib, faces, ncc):
    """render(vertices (B, V, 3)) with the classic loop, image by image, into reused buffers."""
    faces = faces.contiguous()
    ncc = ncc.contiguous()
    depth = torch.empty(SIZE, SIZE)
    image = torch.empty(SIZE, SIZE, 3)

    def render(vertices, *_):
        for b in range(vertices.shape[0]):
            lib.classic_render(vertices[b].data_ptr(), faces.data_ptr(), faces.shape[0],
                               ncc.data_ptr(), SIZE, SIZE, depth.data_ptr(), image.data_ptr())
        return image
    return render


def unfused(vertices, faces, ncc, height, width):
    face_index, bary, _ = pncc_cuda.rasterize(vertices, faces, height, width)
    pncc = pncc_cuda.interpolate(ncc.unsqueeze(0), faces, face_index, bary).permute(0, 3, 1, 2)
    return pncc.contiguous(), (face_index >= 0).unsqueeze(1)


def candidates(device, all_threads, classic):
    """Groups of (row name, function, is the reference), each group timed interleaved with the
    group's thread count (None on CUDA) -> [(threads, rows)]."""
    if device == "cuda":
        return [(None, [("render_pncc (CUDA)", pncc_cuda.render_pncc, False),
                        ("rasterize+interpolate, unfused (CUDA)", unfused, False),
                        ("reference, PyTorch (CUDA)", reference.render_pncc_reference, True)])]
    one = [("render_pncc (CPU, 1 thread)", pncc_cuda.render_pncc, False)]
    if classic is not None:
        one.append((f"{CLASSIC} (CPU, 1 thread)", classic, False))
    one.append(("reference, PyTorch (CPU, 1 thread)", reference.render_pncc_reference, True))
    groups = [(1, one)]
    if all_threads > 1:
        groups.append((all_threads, [
            (f"render_pncc (CPU, {all_threads} threads)", pncc_cuda.render_pncc, False),
            (f"rasterize+interpolate, unfused (CPU, {all_threads} threads)", unfused, False),
            (f"reference, PyTorch (CPU, {all_threads} threads)", reference.render_pncc_reference,
             True)]))
    return groups


def interleaved_medians(fns, device, repeats, sparse, cpu_clock, warmup=2):
    """Median wall and CPU seconds of each callable of `fns` (name -> fn), timed in interleaved
    rounds of shuffled order (_common.interleaved_times) -> ({name: wall s}, {name: CPU s}).
    `cpu_clock` is time.thread_time for one thread (everything then runs on the calling thread)
    or time.process_time. The names in `sparse` (the slow reference) run only every third
    round."""
    wall, cpu = interleaved_times(fns, device, repeats, warmup, sparse=sparse, cpu_clock=cpu_clock)
    return ({name: statistics.median(t) for name, t in wall.items()},
            {name: statistics.median(t) for name, t in cpu.items()})


def back_to_back_medians(fns, blocks, per_block):
    """Median thread CPU seconds per call of each callable of `fns` run `per_block` times in a row
    (after one untimed call), the blocks of the callables alternating: the caches then hold the
    callable's own data, as in a loop that renders one image after another. One thread."""
    times = {name: [] for name in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            fn()
            for _ in range(per_block):
                start = time.thread_time()
                fn()
                times[name].append(time.thread_time() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def back_to_back_rows(mesh, vertices, faces, ncc, classic, repeats):
    """render_pncc and the classic loop each run back to back on one thread (warm caches): the
    interleaved rows above make every call start with caches that the other rows filled."""
    fns = {"render_pncc (CPU, 1 thread, back to back)":
           lambda: pncc_cuda.render_pncc(vertices, faces, ncc, SIZE, SIZE),
           f"{CLASSIC} (CPU, 1 thread, back to back)": lambda: classic(vertices)}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    seconds = back_to_back_medians(fns, blocks=max(3, repeats // 3), per_block=10)
    torch.set_num_threads(previous)
    batch = vertices.shape[0]
    base = seconds[f"{CLASSIC} (CPU, 1 thread, back to back)"]
    return [{"mesh": mesh.source, "triangles": mesh.faces.shape[0], "batch": batch,
             "device": "cpu", "threads": 1, "row": name,
             "ms_per_image": 1e3 * t / batch, "cpu_ms_per_image": 1e3 * t / batch,
             "images_per_s": batch / t, "is_reference": False, "speedup_vs_reference": None,
             "time_vs_classic_loop": t / base} for name, t in seconds.items()]


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


def run(meshes=MESHES, batches=BATCHES, repeats=15, devices=None, cuda_batches=CUDA_BATCHES,
        classic_lib=None):
    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    all_threads = torch.get_num_threads()
    rows = []
    for num_faces in meshes:
        mesh = face_mesh(num_faces, size=SIZE)
        for device in devices:
            faces, ncc = mesh.faces.to(device), mesh.ncc.to(device)
            classic = classic_renderer(classic_lib, faces, ncc) if classic_lib and device == "cpu" \
                else None
            for batch in batches if device == "cpu" else cuda_batches:
                vertices = mesh.batch(batch).to(device)
                for threads, group_rows in candidates(device, all_threads, classic):
                    if threads:
                        torch.set_num_threads(threads)
                    fns = {name: (lambda fn=fn: fn(vertices, faces, ncc, SIZE, SIZE))
                           for name, fn, _ in group_rows}
                    sparse = {name for name, _, is_ref in group_rows if is_ref}
                    # On a shared machine a busy neighbour stretches wall time but not the CPU
                    # time of a single thread: the 1-thread ratios are taken from the latter.
                    cpu_clock = time.thread_time if threads == 1 else time.process_time
                    seconds, cpu_seconds = interleaved_medians(fns, device, repeats, sparse,
                                                               cpu_clock)
                    group = []
                    for name, fn, is_reference in group_rows:
                        group.append({
                            "mesh": mesh.source, "triangles": num_faces, "batch": batch,
                            "device": device, "threads": threads, "row": name,
                            "ms_per_image": 1e3 * seconds[name] / batch,
                            "cpu_ms_per_image": 1e3 * cpu_seconds[name] / batch,
                            "images_per_s": batch / seconds[name], "is_reference": is_reference,
                        })
                        if device == "cuda" and fn is pncc_cuda.render_pncc:
                            group[-1]["peak_memory_vs_outputs_plus_zbuffer"] = peak_memory_ratio(
                                vertices, faces, ncc)
                    torch.set_num_threads(all_threads)
                    ref = next(r for r in group if r["is_reference"])
                    base = next((r for r in group if r["row"].startswith(CLASSIC)), None)
                    # Ratios of CPU time on one thread (see above), of wall time otherwise.
                    key = "cpu_ms_per_image" if threads == 1 else "ms_per_image"
                    for r in group:
                        r["speedup_vs_reference"] = ref[key] / r[key]
                        if base is not None:
                            r["time_vs_classic_loop"] = r[key] / base[key]
                    rows += group
                if classic is not None:
                    rows += back_to_back_rows(mesh, vertices, faces, ncc, classic, repeats)
    return rows


def time_split(split_lib, num_faces, repeats):
    """The CPU rasterizer's cull / cover / resolve times and rejection rate, per culling variant
    this CPU supports (one thread, one image; raster_split.cpp)."""
    mesh = face_mesh(num_faces, size=SIZE)
    vertices, faces, ncc = mesh.vertices.contiguous(), mesh.faces.contiguous(), mesh.ncc.contiguous()
    rows = []
    for variant in ("scalar", "avx2", "avx512"):
        out = (ctypes.c_double * 5)()
        status = split_lib.raster_split(vertices.data_ptr(), vertices.shape[0], faces.data_ptr(),
                                        faces.shape[0], ncc.data_ptr(), SIZE, SIZE,
                                        variant.encode(), repeats, out)
        if status != 0:
            continue  # not supported on this CPU
        cull, cover, resolve, survivors, covered = out
        rows.append({"mesh": mesh.source, "triangles": num_faces, "variant": variant,
                     "cull_ms": 1e3 * cull, "cover_ms": 1e3 * cover, "resolve_ms": 1e3 * resolve,
                     "total_ms": 1e3 * (cull + cover + resolve),
                     "rejected": 1.0 - survivors / num_faces, "covered_pixels": int(covered)})
    return rows


def markdown_split(rows):
    lines = ["| mesh | triangles | culling variant | cull ms | cover ms | resolve ms | total ms "
             "| triangles rejected |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mesh']} | {r['triangles']} | {r['variant']} | {r['cull_ms']:.3f} | "
                     f"{r['cover_ms']:.3f} | {r['resolve_ms']:.3f} | {r['total_ms']:.3f} | "
                     f"{100 * r['rejected']:.1f}% |")
    return "\n".join(lines)


def markdown(rows):
    lines = [
        "| mesh | triangles | batch | row | ms / image | CPU ms / image | images / s "
        "| time / classic loop | x reference | peak mem / bound |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        memory = r.get("peak_memory_vs_outputs_plus_zbuffer")
        classic = r.get("time_vs_classic_loop")
        speedup = r["speedup_vs_reference"]
        lines.append(
            f"| {r['mesh']} | {r['triangles']} | {r['batch']} | {r['row']} | "
            f"{r['ms_per_image']:.3f} | {r['cpu_ms_per_image']:.3f} | {r['images_per_s']:.0f} | "
            f"{'-' if classic is None else f'{classic:.2f}x'} | "
            f"{'-' if speedup is None else f'{speedup:.1f}'} | "
            f"{'-' if memory is None else f'{memory:.2f}'} |"
        )
    return "\n".join(lines)


def machine():
    return machine_facts(raster_cull_variant=torch.ops.pncc._raster_cpu_variant())


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
    classic_lib, split_lib = build_native(args.out / "lib")
    if args.smoke:
        rows = run(meshes=(76073,), batches=(1,), repeats=3, classic_lib=classic_lib)
    else:
        rows = run(meshes=args.meshes or MESHES, batches=args.batches or BATCHES,
                   repeats=args.repeats, devices=args.devices,
                   cuda_batches=args.batches or CUDA_BATCHES, classic_lib=classic_lib)
    split_rows = []
    if split_lib is not None and "cpu" in (args.devices or ["cpu"]):
        for num_faces in (76073,) if args.smoke else MESHES:
            split_rows += time_split(split_lib, num_faces, 3 if args.smoke else 4 * args.repeats)
    info = machine()
    print(f"CPU: {info['cpu']}; culling variant in use: {info['raster_cull_variant']}\n")
    print(markdown(rows))
    if split_rows:
        print("\nCPU rasterizer time split (one thread, one image):\n")
        print(markdown_split(split_rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "raster.json").write_text(
        json.dumps({"machine": info, "rows": rows, "time_split": split_rows}, indent=2))
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
            sync(device)
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
