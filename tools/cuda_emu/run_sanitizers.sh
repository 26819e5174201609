#!/usr/bin/env bash
# Builds race_driver.cpp twice, under ThreadSanitizer and under AddressSanitizer + UBSan, and runs
# both: the emulated CUDA kernels must show no data race, no out-of-bounds access, no UB.
# The two sanitizers build and run side by side (each build is one compiler process, each run is
# in effect one core: the emulated threads take turns at barriers), so on a 2-core CI runner the
# step takes the time of the slower one, not of both; their logs are printed in order.
set -euo pipefail
export EMU_EXECUTOR=threads  # sanitizers need the real interleavings of OS threads
cd "$(dirname "$0")/../.."
out=build/cuda_emu/sanitizers
mkdir -p "$out/src"
python tools/cuda_emu/build.py --sources "$out/src" >/dev/null
torch_dir=$(python -c "import os, torch; print(os.path.dirname(torch.__file__))")
common=(-std=c++20 -O1 -g -fno-omit-frame-pointer -ffp-contract=off
        -Itools/cuda_emu/shim -Itools/cuda_emu -I"$out/src" -Icsrc -isystem "$torch_dir/include"
        -isystem "$torch_dir/include/torch/csrc/api/include"
        tools/cuda_emu/race_driver.cpp csrc/corr/corr_check.cpp csrc/raster/raster_check.cpp
        -L"$torch_dir/lib" -Wl,-rpath,"$torch_dir/lib" -lc10 -ltorch_cpu -lpthread)
build_and_run() {
  local san=$1 exe="$out/race_driver_${1%%,*}"
  echo "=== building with -fsanitize=$san"
  g++ "${common[@]}" -fsanitize="$san" -o "$exe"
  echo "=== running $exe"
  TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
    ASAN_OPTIONS="detect_leaks=0" UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1" "$exe"
}
pids=() logs=()
for san in ${EMU_SANITIZERS:-thread address,undefined}; do
  log="$out/${san%%,*}.log"
  build_and_run "$san" >"$log" 2>&1 &
  pids+=($!) logs+=("$log")
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || status=1
  cat "${logs[$i]}"
done
exit $status
