#!/usr/bin/env bash
# The multi-GPU runs on a 2- or 4-GPU host: build with NVSHMEM, the multi-GPU tests (exchange,
# weight moves, the MoE example under torchrun), then the exchange and weight-move benchmarks on
# 2 and 4 GPUs. Logs and JSON records go to $OUT (default /tmp/lplb-out).
# Usage: bash bench/device_multi.sh [build] [test] [bench]   (no argument: all three)
set -uo pipefail
OUT=${OUT:-/tmp/lplb-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test bench)
status=0
gpus=$(nvidia-smi -L | wc -l)
tag=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o "H[0-9]*" | tr "H" "h")

for step in "${steps[@]}"; do
  start=$SECONDS
  case "$step" in
    build)
      bash bench/exchange_run.sh build || exit 1
      ;;
    test)
      timeout 480 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests 2>&1 \
        | tee "$OUT/pytest_multi.log" | tail -30
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    bench)
      for n in 2 "$gpus"; do
        timeout 290 python3 bench/bench_moves.py --gpus "$n" --out "$OUT/moves_${n}gpu_${tag}.json" \
          2>&1 | tee "$OUT/bench_moves_${n}gpu.log" | tail -40
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        timeout 150 python3 bench/bench_exchange.py --gpus "$n" \
          --out "$OUT/exchange_${n}gpu_${tag}.json" 2>&1 | tee "$OUT/bench_exchange_${n}gpu.log" \
          | tail -20
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      done
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "== $step took $((SECONDS - start)) s"
done
exit $status
