#!/usr/bin/env bash
# Build lplb._C with its CUDA kernels, then run the GPU tests, compute-sanitizer and the
# benchmark on a GPU machine. Logs and the benchmark JSON go to $OUT (default /tmp/lplb-out).
# Usage: bash bench/device_run.sh [build] [test] [sanitize] [bench]   (no argument: all four)
set -uo pipefail
OUT=${OUT:-/tmp/lplb-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test sanitize bench)
status=0

for step in "${steps[@]}"; do
  start=$SECONDS
  case "$step" in
    build)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv \
        > "$OUT/nvidia-smi.txt" 2>&1
      LPLB_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
        || { tail -40 "$OUT/build.log"; exit 1; }
      python3 -c "from lplb import _C; assert _C.has_cuda; print('built with CUDA')"
      ;;
    test)
      python3 -m pytest -q -n 6 -p no:cacheprovider tests/test_gpu_count_map.py \
        tests/test_gpu_solve.py tests/test_gpu_planner.py 2>&1 | tee "$OUT/pytest_gpu.log" \
        | tail -25 || status=1
      ;;
    sanitize)
      for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 3 python3 bench/sanitize_kernels.py \
          > "$OUT/sanitizer_$tool.log" 2>&1 || status=1
        echo "== $tool"; tail -4 "$OUT/sanitizer_$tool.log"
      done
      ;;
    bench)
      python3 bench/bench_lplb.py --out "$OUT/lplb_h100.json" 2>&1 | tee "$OUT/bench.log" \
        || status=1
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "== $step took $((SECONDS - start)) s"
done
exit $status
