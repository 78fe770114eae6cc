#!/usr/bin/env bash
# Build both extensions with the CUDA kernels, then run the GPU tests, compute-sanitizer and the
# benchmarks on a GPU machine. Logs and JSON records go to $OUT (default /tmp/lplb-out).
# Wheels in .whl/ (test dependencies the machine lacks) are installed to /tmp/site first.
# Usage: bash bench/device_run.sh [build] [test] [sanitize] [bench] [make]   (none: the first four)
set -uo pipefail
OUT=${OUT:-/tmp/lplb-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
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
      python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/pytest_gpu.log" \
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
    make)
      make test 2>&1 | tee "$OUT/make_test.log" | tail -6 || status=1
      make demo 2>&1 | tee "$OUT/make_demo.log" | tail -40 || status=1
      cp "$(ls -td demo_out/*/ | head -1)report.json" "$OUT/demo_report.json" 2>/dev/null
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "== $step took $((SECONDS - start)) s"
done
exit $status
