#!/usr/bin/env bash
# The README's main-job command (offline, built-in data): sets up a fresh machine, then
#  1. `reenact demo --out demo`: first a real face with no training (the astronaut portrait driven by
#     scripted expressions and Grace Hopper's pose in the geometric mode: demo/real_face.mp4,
#     demo/real_face_grid.png, in seconds); then synthesises toy-head clips, trains the small model
#     for a few minutes on the CPU, reenacts a held-out identity and writes demo/result.mp4,
#     demo/grid.png, demo/loss.png (extra arguments go to it, e.g. --steps 400 or --seed 3);
#  2. renders PNCC images of a built-in face mesh at several poses to out/pncc_demo.png;
#  3. prints the rasterizer benchmark table (out/bench/raster.{json,png}).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
"${PYTHON:-python3}" -m reenact demo --out demo "$@"
"${PYTHON:-python3}" -m reenact.pncc_demo --out out
exec "${PYTHON:-python3}" bench/bench_raster.py --repeats 7 --out out/bench
