#!/usr/bin/env bash
# Issue 10 item 7 in ONE device call (~8 min on an H100/H200; every step writes its result under
# $OUT as soon as it ends, so a timeout keeps what finished):
#   kernel tuning of the SmolLM2-135M and Llama-7B decode GEMMs (M = 1, P = 1, 2 (4 for 7B)),
#   `tune` on the embedded SmolLM2 (real weights: quality + latency, CUDA graph),
#   plan latency on a random-weight Llama-7B, with and without the tuned launch config.
# Record the numbers with the card in benchmarks/NOTES.md ("Tuning").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-reports/gpu_tune}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
# the compiled module is optional here (the csrc attention is timed if it builds)
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
    || { echo "install failed, see install.log"; tail -20 "$OUT/install.log"; exit 1; }
step() { local name=$1; shift; echo "== $name"; timeout "$@" 2>&1 | tee "$OUT/$name.log" | tail -25; }
step kernels_smollm2 200 python3 benchmarks/tune_kernels.py --shape smollm2-135m --parallel 1 2 --quick \
    --time-budget 150 --out "$OUT" --no-progress
step kernels_llama7b 200 python3 benchmarks/tune_kernels.py --shape llama-7b --parallel 1 2 4 --quick \
    --time-budget 150 --out "$OUT" --no-progress
CFG=$(ls "$OUT"/NVIDIA*.json 2>/dev/null | head -1)
step tune_smollm2 150 python3 -m cqil_kernels tune --device cuda --dtype bfloat16 --parallel 2,4 --max-groups 4 \
    --max-windows 4 --seq-len 512 --context-lengths 256,1024 --batch-sizes 1,4 --repeats 5 --world-size 2 \
    ${CFG:+--launch-config "$CFG"} --out "$OUT/tune_smollm2" --no-progress
step latency_llama7b_heuristics 60 python3 benchmarks/tune_latency.py --shape llama-7b --parallel 2 4 \
    --context-lengths 256 --out "$OUT/latency_llama7b_heuristics.json"
[ -n "$CFG" ] && step latency_llama7b_tuned 60 python3 benchmarks/tune_latency.py --shape llama-7b --parallel 2 4 \
    --context-lengths 256 --launch-config "$CFG" --out "$OUT/latency_llama7b_tuned.json"
echo "done: $(ls "$OUT")"
