#!/usr/bin/env bash
# One command for a lent GPU machine: build with CUDA, run the CUDA tests, run
# compute-sanitizer (memcheck, racecheck) over the CUDA op tests, run every benchmark. Results go
# to $OUT (the device tool's output folder) or bench/out/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
status=0
log() { echo; echo "=== $*"; }
run() { "$@" || { echo "FAILED ($?): $*"; status=1; }; }
# run_to FILE CMD...: runs CMD, showing and saving its output, and records a failure.
run_to() {
  local file=$1; shift
  "$@" 2>&1 | tee "$file"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "FAILED ($rc): $*"; status=1; }
}

log "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

log "build (FORCE_CUDA=1, native arch)"
export FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")}
run ./scripts/setup.sh

log "CUDA tests"
run_to "$OUT/cuda_tests.txt" "$PYTHON" -m pytest tests -m cuda -q -p no:cacheprovider

SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$SANITIZER" ]; then
  for tool in memcheck racecheck; do
    log "compute-sanitizer $tool over the CUDA op tests"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_to "$OUT/sanitizer_$tool.txt" "$SANITIZER" \
      --tool "$tool" --error-exitcode 1 "$PYTHON" -m pytest tests/test_raster.py tests/test_corr.py \
      -m cuda -q -x -p no:cacheprovider -k "not beyond_int32 and not repeated"
  done
else
  echo "compute-sanitizer not found" | tee "$OUT/sanitizer_missing.txt"; status=1
fi

log "benchmarks"
for bench in bench/bench_*.py; do
  run_to "$OUT/$(basename "$bench" .py).md" "$PYTHON" "$bench"
done
cp -r bench/out/. "$OUT/" 2>/dev/null || true  # the benchmarks' JSON and plots
exit $status
