#!/usr/bin/env bash
# One phase of the GPU checks, for a session lent an H100/H200 (device tool: each command may run
# 10 minutes; results come back from $OUT). Run the phases as separate device calls:
#
#   bash benchmarks/gpu_session.sh tests     # build (CUDA module required), GPU tests   ~3 min
#   bash benchmarks/gpu_session.sh kernels   # benchmarks/bench_kernels.py               ~3 min
#   bash benchmarks/gpu_session.sh e2e       # benchmarks/e2e_decode.py, both shapes     ~8 min
#   bash benchmarks/gpu_session.sh launches  # benchmarks/launch_count.py on CUDA       ~1 min
#
# The GPU image has torch 2.11+cu130, triton 3.6.0, transformers 5.17.0 and no network: the
# project installs without dependencies. Record the numbers (card, versions) in benchmarks/NOTES.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-reports/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
phase="${1:-tests}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
CQIL_REQUIRE_BUILD=1 python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
    || { echo "install failed, see install.log"; tail -20 "$OUT/install.log"; exit 1; }
case "$phase" in
  tests)
    python3 -m pytest -q --device cuda -x tests 2>&1 | tee "$OUT/tests_cuda.log" | tail -30 ;;
  kernels)
    python3 benchmarks/bench_kernels.py --out "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench_kernels.log" | tail -60 ;;
  e2e)
    python3 benchmarks/e2e_decode.py --out "$OUT/e2e_decode.json" 2>&1 | tee "$OUT/e2e_decode.log" | tail -60 ;;
  launches)
    python3 benchmarks/launch_count.py --device cuda --out "$OUT/launch_count.json" 2>&1 | tee "$OUT/launch_count.log" | tail -20 ;;
  *)
    echo "unknown phase $phase: tests | kernels | e2e | launches"; exit 2 ;;
esac
