"""Offline PNCC demo: renders the PNCC of a built-in face mesh at several head poses.

    python -m reenact.pncc_demo --out out

Writes out/pncc_demo.png: a grid of poses (rows: pitch, columns: yaw), each rendered with
pncc_cuda.render_pncc at 256x256 in one batched call. The mesh is 3DDFA_V2's 76,073-triangle BFM
mesh when ../shared/data/face-models is present, otherwise a generated head surface with the same
triangle count (the image caption says which).
"""
import argparse
import pathlib
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

import pncc_cuda
from pncc_cuda.testing import face_mesh

YAWS = (-60.0, -30.0, 0.0, 30.0, 60.0)
PITCHES = (-20.0, 0.0, 20.0)


def render_grid(size=256, device="cpu"):
    """Returns (grid image uint8 (rows*size, cols*size, 3), mesh source, seconds per image)."""
    meshes = [face_mesh(76073, size=size, yaw=yaw, pitch=pitch) for pitch in PITCHES for yaw in YAWS]
    vertices = torch.stack([m.vertices for m in meshes]).to(device)
    faces, ncc = meshes[0].faces.to(device), meshes[0].ncc.to(device)
    start = time.perf_counter()
    pncc, mask = pncc_cuda.render_pncc(vertices, faces, ncc, size, size)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / len(meshes)
    images = (pncc * mask).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    rows = [np.concatenate(list(images[r * len(YAWS):(r + 1) * len(YAWS)]), axis=1)
            for r in range(len(PITCHES))]
    return np.concatenate(rows, axis=0), meshes[0].source, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    grid, source, seconds = render_grid(args.size, args.device)
    caption = f"PNCC, {source}; yaw {YAWS[0]:+.0f}..{YAWS[-1]:+.0f} deg, pitch {PITCHES[0]:+.0f}..{PITCHES[-1]:+.0f} deg"
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + 24), "white")
    canvas.paste(Image.fromarray(grid), (0, 24))
    ImageDraw.Draw(canvas).text((6, 6), caption, fill="black")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "pncc_demo.png"
    canvas.save(path)
    print(f"wrote {path}: {len(YAWS) * len(PITCHES)} poses of the {source}, "
          f"{1e3 * seconds:.2f} ms per image on {args.device}")
    return path


if __name__ == "__main__":
    main()
