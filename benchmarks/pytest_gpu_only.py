"""pytest plugin of ``gpu_check.py``: select the GPU-only tests, and log every result as it happens.

    PYTHONPATH=benchmarks python -m pytest -p pytest_gpu_only --device cuda tests

- With ``CQIL_GPU_ONLY=1`` only the tests that need a GPU are kept: those that request the
  ``cuda_device`` fixture or carry the ``gpu`` marker. The CPU suite (which ``./test.sh`` runs) is
  deselected, so its failures cannot hide the GPU tests and its time is not spent.
  ``CQIL_GPU_ONLY=exclude`` keeps the others instead (the interpreter suite's kernel tests, which
  ``--device cuda`` runs on the compiled kernels).
- With ``CQIL_JSONL=<path>`` every test's outcome is appended to that JSONL file the moment it is
  known (``step_log.StepLog``; step name ``CQIL_STEP``): a step killed at its timeout keeps every
  result reported before.
"""

from __future__ import annotations

import os

from step_log import StepLog

_LOG: StepLog | None = None


def _needs_gpu(item) -> bool:
    return "cuda_device" in getattr(item, "fixturenames", ()) or item.get_closest_marker("gpu") is not None


def pytest_configure(config):
    global _LOG
    path = os.environ.get("CQIL_JSONL")
    _LOG = StepLog(path, os.environ.get("CQIL_STEP", "gpu-tests")) if path else None


def pytest_collection_modifyitems(config, items):
    mode = os.environ.get("CQIL_GPU_ONLY")
    if mode not in ("1", "exclude"):
        return
    want = mode == "1"
    keep = [i for i in items if _needs_gpu(i) == want]
    drop = [i for i in items if _needs_gpu(i) != want]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    if _LOG is not None:
        _LOG.emit("ok", dict(kind="selection", selected=len(keep), deselected=len(drop)))


def pytest_runtest_logreport(report):
    if _LOG is None:
        return
    # one line per test: its call's outcome, or a setup/teardown that failed or skipped
    if report.when == "call" or (report.when != "call" and (report.failed or report.skipped)):
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        payload = dict(kind="test", nodeid=report.nodeid, when=report.when, duration_s=round(report.duration, 3))
        if report.failed or report.skipped:
            text = report.longreprtext if report.failed else str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
            payload["message"] = text[-1500:]
        _LOG.emit({"passed": "ok", "failed": "fail"}.get(outcome, outcome), payload)
