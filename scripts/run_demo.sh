#!/usr/bin/env bash
# The README's main-job command (offline, built-in data): sets up a fresh machine, renders PNCC
# images of a built-in face mesh at several poses to out/pncc_demo.png, and prints the rasterizer
# benchmark table.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
"${PYTHON:-python3}" -m reenact.pncc_demo --out out "$@"
exec "${PYTHON:-python3}" bench/bench_raster.py --repeats 7 --out out/bench
