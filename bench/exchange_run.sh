#!/usr/bin/env bash
# The NVSHMEM workload exchange on a multi-GPU host (docs/exchange.md): build lplb with
# LPLB_NVSHMEM=1, run tests/test_gpu_exchange.py (2 and 4 GPUs) and bench/bench_exchange.py on
# 2 and 4 GPUs. Logs, the benchmark JSON and nvidia-smi topology go to $OUT (default
# /tmp/lplb-out); the JSON also to bench/results/.
# Usage: bash bench/exchange_run.sh [build] [test] [bench]   (no argument: all three)
set -uo pipefail
OUT=${OUT:-/tmp/lplb-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test bench)
status=0

for step in "${steps[@]}"; do
  start=$SECONDS
  case "$step" in
    build)
      nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
      python3 -m pip show nvidia-nvshmem-cu13 > "$OUT/nvshmem_wheel.txt" 2>&1
      LPLB_CUDA=1 LPLB_NVSHMEM=1 python3 -m pip install --no-build-isolation --no-deps -e . \
        > "$OUT/build_nvshmem.log" 2>&1 || { tail -40 "$OUT/build_nvshmem.log"; exit 1; }
      python3 -c "import lplb._nvshmem as m; print('lplb._nvshmem built against NVSHMEM', \
m.build_version, 'runtime', m.runtime_version())" || exit 1
      ;;
    test)
      timeout 570 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu_exchange.py \
        2>&1 | tee "$OUT/pytest_exchange.log" | tail -30
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    bench)
      for n in 2 4; do
        timeout 280 python3 bench/bench_exchange.py --gpus "$n" 2>&1 \
          | tee "$OUT/bench_exchange_${n}gpu.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      done
      cp bench/results/exchange_*gpu_*.json "$OUT/" 2>/dev/null
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "== $step took $((SECONDS - start)) s"
done
exit $status
