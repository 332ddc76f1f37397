"""Append-only JSONL result lines, written as each result is measured (a timeout loses nothing).

Every line is one JSON object: ``step`` (which part of a run), ``status`` ("ok", "fail",
"error", "skipped", "timeout", "done", ...), ``seconds`` (since the step started) and
``payload`` (the measurement itself). ``benchmarks/gpu_check.py`` collects its steps' lines in one
file; the benchmark scripts write the same lines when given ``--jsonl``.

    log = StepLog("results.jsonl", "kernels")
    log.emit("ok", {"op": "qkv_gemm", "us": 12.5})
"""

from __future__ import annotations

import json
import math
import os
import time


def _plain(value):
    """JSON-safe copy: NaN/inf become strings (JSON has no such numbers), unknown objects str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


class StepLog:
    """Appends ``{"step", "status", "seconds", "payload"}`` lines to ``path`` (None: only counts).

    Each line is flushed and fsync'ed before :meth:`emit` returns, so a process killed right after
    still leaves it on disk.
    """

    def __init__(self, path: str | os.PathLike | None, step: str):
        self.path = None if path is None else os.fspath(path)
        self.step = step
        self.start = time.perf_counter()
        self.counts: dict[str, int] = {}
        if self.path:
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)

    def emit(self, status: str, payload=None, seconds: float | None = None) -> dict:
        line = {"step": self.step, "status": status,
                "seconds": round(time.perf_counter() - self.start if seconds is None else seconds, 3),
                "payload": _plain(payload if payload is not None else {})}
        self.counts[status] = self.counts.get(status, 0) + 1
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return line


def read_lines(path) -> list[dict]:
    """Every line of a JSONL file written by :class:`StepLog` (a torn last line is skipped)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for raw in f:
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
    return out
