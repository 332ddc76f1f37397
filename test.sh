#!/usr/bin/env bash
# The test command: sets up .venv (pinned CPU deps, project in editable mode) on first use,
# then runs the whole suite on the CPU. Triton kernels run in the interpreter (tests/conftest.py
# sets TRITON_INTERPRET=1); GPU-only tests skip. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/setup_venv.sh
python -m pytest -q "$@"
