#!/usr/bin/env bash
# One command for a lent GPU machine. A lend is short (at most 10 minutes a command, about 15 in
# all), so the steps run in the order of what they are worth, each under its own `timeout`, and
# each leaves its results in $OUT as soon as it ends: a run cut anywhere still leaves the benchmark
# table of every step that finished.
#
#   bench/gpu_check.sh           all four steps (about 9-12 minutes on an H100)
#   bench/gpu_check.sh --quick   steps 1-3 only: build, CUDA tests, benchmark table (about 5 minutes)
#
# Steps, with estimated times on one H100 and 16 CPU cores:
#   1. build (FORCE_CUDA=1, this GPU's architecture). Skipped when a carried-in build already has
#      this GPU's kernels and imports against the torch that is there.    ~0 s carried, 2-4 min not
#   2. the CUDA tests of the ops and the model (-m cuda).                                ~1-2 min
#   3. the CUDA benchmark rows, in this order:                                          ~2-3 min
#      a. corr_warp bf16, B=16, N=4096, C=256, Cv 258 and 256, fwd and fwd+bwd, against each SDPA
#         backend that accepts the shape and the unfused reference                  (~60 s)
#      b. render_pncc at batch 1 and 256                                            (~30 s)
#      c. one 256x256 batch-16 bf16 training step, fused ops against --ops reference (~60-90 s;
#         needs PyAV for its synthetic clips)
#   4. compute-sanitizer memcheck over a small selection of the op tests, then racecheck over
#      6 small corr_warp cases.                                                          ~3-4 min
#
# Results in $OUT (the device tool's output folder, which returns at most 8 files; bench/out/gpu
# otherwise): gpu_check.log (all output), steps.tsv (step, exit code, seconds), cuda_tests.xml,
# bench_{corr,raster,train}.md (each benchmark's table) and bench_files.tgz (the benchmarks' JSON
# and plots, written to bench/out/gpu-files and re-packed after every benchmark). The GPU machines have their own torch and no network: nothing is
# installed; tests and benchmarks whose packages are missing (DALI, PyAV) are skipped and said so.
# Real face meshes are used when $PNCC_SHARED_DATA/face-models exists; otherwise a generated mesh.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (only --quick)" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out/gpu}
FILES=bench/out/gpu-files
mkdir -p "$OUT" "$FILES"
PYTHON=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
STEPS="$OUT/steps.tsv"
: > "$LOG"
printf 'step\texit\tseconds\n' > "$STEPS"
status=0
has() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }
log() { { echo; echo "=== $* ($(date -u +%H:%M:%S))"; } | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: runs CMD under `timeout`, shows and logs its output, records its exit
# code and duration in steps.tsv at once (exit 124 = cut by the timeout).
step() {
  local name=$1 limit=$2; shift 2
  log "$name (limit ${limit}s)"
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" ${COPY:+"$COPY"}
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" >> "$STEPS"
  [ "$rc" -eq 0 ] || { echo "FAILED ($rc): $name" | tee -a "$LOG"; status=1; }
  return "$rc"
}
# bench NAME LIMIT_S CMD...: a benchmark step whose output (its markdown table) is also kept as
# $OUT/bench_NAME.md; its files go to $FILES, packed into $OUT at once.
bench() {
  local name=$1 limit=$2; shift 2
  COPY="$OUT/bench_$name.md" step "3. benchmark $name" "$limit" "$@" --out "$FILES"
  tar -czf "$OUT/bench_files.tgz" -C "$FILES" . 2>/dev/null
}

log "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$LOG"
lscpu 2>/dev/null | grep -m1 'Model name' | tee -a "$LOG"

# ---- 1. build ----------------------------------------------------------------------------------
export FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")}
if "$PYTHON" scripts/check_build.py --quiet --require-cuda >/dev/null 2>&1 \
   && "$PYTHON" -c "import torch, pncc_cuda; x = torch.zeros(1, 4, 8, device='cuda'); pncc_cuda.corr_warp(x, x, x, 0.1)" >/dev/null 2>&1; then
  log "1. build: the carried-in extension has CUDA kernels for this GPU; not rebuilt"
  printf 'build\t0\t0\n' >> "$STEPS"
else
  step "1. build (arch $TORCH_CUDA_ARCH_LIST)" 360 "$PYTHON" setup.py build_ext --inplace -j "$(nproc)" \
    || { echo "the build failed: nothing else can run" | tee -a "$LOG"; exit 1; }
fi
step "1. kernels registered" 60 "$PYTHON" scripts/check_build.py --require-cuda

# ---- 2. CUDA tests -------------------------------------------------------------------------------
tests=(tests/test_raster.py tests/test_raster_fuzz.py tests/test_corr.py tests/test_corr_kernels.py)
for module in tests/test_model_*.py tests/test_face3d_*.py; do tests+=("$module"); done
if has nvidia.dali && has av; then
  tests+=(tests/test_data_*.py)
else
  echo "DALI or PyAV is not installed here: the data pipeline's GPU tests are not run" | tee -a "$LOG"
fi
step "2. CUDA tests" 240 "$PYTHON" -m pytest "${tests[@]}" -m cuda -q -p no:cacheprovider -rs \
  --junitxml="$OUT/cuda_tests.xml"

# ---- 3. CUDA benchmark rows ----------------------------------------------------------------------
bench corr 180 "$PYTHON" bench/bench_corr.py --device cuda --dtype bfloat16 --batches 16 \
  --cv 258 256 --sdpa-backends --repeats 10
bench raster 120 "$PYTHON" bench/bench_raster.py --devices cuda --batches 1 256 --repeats 10
if has av; then  # bench_train encodes its synthetic clips with PyAV
  bench train 240 "$PYTHON" bench/bench_train.py --devices cuda
else
  echo "PyAV is not installed here: the training-step benchmark is not run" | tee -a "$LOG"
fi
if [ "$QUICK" = 1 ]; then
  log "--quick: stopping after the benchmarks"
  exit $status
fi

# ---- 4. compute-sanitizer ------------------------------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -z "$SANITIZER" ]; then
  echo "compute-sanitizer not found" | tee -a "$LOG"; exit 1
fi
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
step "4a. memcheck, small op cases" 150 "$SANITIZER" --tool memcheck --error-exitcode 1 \
  "$PYTHON" -m pytest tests/test_raster.py tests/test_corr.py tests/test_corr_kernels.py -m cuda -q -x \
  -p no:cacheprovider -k "(test_accuracy and shape0) or stress_value_channels or (stress_sizes and not 1025) or (low_precision_shapes and (shape0 or shape3)) or deterministic_mode or rasterize_matches_reference or render_pncc_equals or degenerate_triangles or non_finite"
step "4b. racecheck, a few small corr_warp cases" 150 "$SANITIZER" --tool racecheck \
  --error-exitcode 1 "$PYTHON" -m pytest tests/test_corr.py tests/test_corr_kernels.py -m cuda -q -x \
  -p no:cacheprovider -k "(stress_sizes and (17 or 97)) or (stress_value_channels and 258) or (test_accuracy and shape0 and dtype2)"
exit $status
