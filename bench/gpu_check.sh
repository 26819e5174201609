#!/usr/bin/env bash
# One command for a lent GPU machine: build with CUDA, run the CUDA tests, run compute-sanitizer
# (memcheck, racecheck) over the CUDA op tests, run the benchmarks. Everything printed goes to
# $OUT/gpu_check.log, and the benchmarks' JSON files next to it ($OUT is the device tool's output
# folder, which returns at most 8 files; bench/out/gpu otherwise).
#
# The GPU machines have their own torch and no network: nothing is installed here, the extension
# is built against the torch that is there, and the tests or benchmarks whose packages are missing
# (DALI, PyAV, mediapipe) are skipped and reported. The real face meshes are used when
# $PNCC_SHARED_DATA/face-models exists (carry a copy of ../shared/data/face-models into an ignored
# folder and point PNCC_SHARED_DATA at it); otherwise the benchmarks say they used a generated mesh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
: > "$LOG"
status=0
log() { { echo; echo "=== $*"; } | tee -a "$LOG"; }
# run CMD...: runs CMD, showing and logging its output, and records a failure.
run() {
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "FAILED ($rc): $*" | tee -a "$LOG"; status=1; }
}
has() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

log "device"
run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

log "build (FORCE_CUDA=1, this GPU's architecture)"
export FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")}
run "$PYTHON" setup.py build_ext --inplace
run "$PYTHON" scripts/check_build.py --require-cuda

log "CUDA tests"
tests=(tests/test_raster.py tests/test_raster_fuzz.py tests/test_corr.py)
for module in tests/test_model_*.py tests/test_face3d_*.py; do tests+=("$module"); done
if has nvidia.dali && has av; then
  tests+=(tests/test_data_*.py)
else
  echo "DALI or PyAV is not installed here: the data pipeline's GPU tests are not run" | tee -a "$LOG"
fi
run "$PYTHON" -m pytest "${tests[@]}" -m cuda -q -p no:cacheprovider -rs

SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$SANITIZER" ]; then
  for tool in memcheck racecheck; do
    log "compute-sanitizer $tool over the CUDA op tests"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run "$SANITIZER" \
      --tool "$tool" --error-exitcode 1 "$PYTHON" -m pytest tests/test_raster.py tests/test_corr.py \
      -m cuda -q -x -p no:cacheprovider -k "not beyond_int32 and not repeated"
  done
else
  echo "compute-sanitizer not found" | tee -a "$LOG"; status=1
fi

log "benchmarks"
for bench in bench/bench_raster.py bench/bench_corr.py bench/bench_model.py bench/bench_fit.py; do
  run "$PYTHON" "$bench"
done
run "$PYTHON" bench/bench_model.py --device cuda --config paper --dtype bfloat16
if has nvidia.dali && has av; then
  run "$PYTHON" bench/bench_data.py
fi
if has av; then  # bench_train encodes its synthetic clips with PyAV
  run "$PYTHON" bench/bench_train.py --devices cpu cuda
  cp bench/out/train/train.json "$OUT/train.json" 2>/dev/null
else
  echo "PyAV is not installed here: bench_train.py (training step) is not run" | tee -a "$LOG"
fi
[ "$(cd bench/out && pwd)" = "$(cd "$OUT" && pwd)" ] || cp bench/out/*.json "$OUT/" 2>/dev/null
exit $status
