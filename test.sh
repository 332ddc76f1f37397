#!/usr/bin/env bash
# The test command: sets up .venv (pinned CPU deps, project in editable mode) on first use,
# then runs the whole suite on the CPU. Triton kernels run in the interpreter (tests/conftest.py
# sets TRITON_INTERPRET=1); GPU-only tests skip. Extra arguments go to pytest (e.g. -n 0: one
# process; tests/test_cli.py: one file).
# Two workers (pytest-xdist), one per core of the CI machine, tests handed out one by one (a
# long file does not hold one worker while the other idles; module fixtures are tiny models).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/setup_venv.sh
# one torch thread per worker: oversubscribed OpenMP threads spin (see .ci/run)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q -n 2 --dist load "$@"
