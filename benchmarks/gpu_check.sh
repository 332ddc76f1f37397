#!/usr/bin/env bash
# Every GPU check in one call, for a session lent an H100/H200 (the device tool: one command of at
# most 10 minutes; results come back from $OUT). Nothing is installed or built: the checkout runs
# from PYTHONPATH with the image's torch/triton/transformers; the compiled module is optional.
# The exact device-tool call is in benchmarks/NOTES.md ("The one GPU call"). Arguments go to
# benchmarks/gpu_check.py (e.g. --steps kernels e2e, --budget-s 300, --dry-run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-reports/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
PY="$(command -v python3 || command -v python)"
exec "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
