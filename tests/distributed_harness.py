"""Run a function on W local processes joined by a process group; return what each rank returned.

``run_ranks(fn, world_size, *args)`` starts W processes with torchrun's environment variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, a free MASTER_PORT), calls
``cqil_kernels.distributed.init(backend, timeout=pg_timeout)`` in each (so the launch code is
exercised too) and then ``fn(ctx, *args)``. Children return plain data (tensors sent through a
queue die with the child): convert with ``.tolist()``. Everything is bounded: the process-group
timeout inside, a join timeout outside; leftover children are terminated.

Processes come from a ``forkserver`` with torch preloaded: a fresh interpreter importing torch
costs seconds on a busy 2-core machine, a fork of the preloaded server a fraction of one. ``fn``
must be importable (a module-level function of a test module or of this file).

A child's exception is re-raised in the parent as :class:`RankError` carrying the child's type
name and traceback text; with ``expect_failure=True`` the per-rank :class:`RankOutcome` list is
returned instead (for the fault tests).
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import socket
import time
import traceback
from dataclasses import dataclass

_PRELOAD = ["torch", "torch.distributed", "cqil_kernels", "cqil_kernels.distributed"]
_context = None


def _mp_context():
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        _context = ctx
    return _context


def free_port() -> int:
    """A TCP port free on localhost right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankOutcome:
    """What one rank did: returned ``value``, raised (``error_type``/``message``/``traceback``),
    or neither (``exitcode``: died, or was terminated by the harness after the others finished)."""

    rank: int
    status: str  # "ok", "error", "exited", "terminated"
    value: object = None
    error_type: str | None = None
    message: str | None = None
    traceback: str | None = None
    exitcode: int | None = None
    elapsed_s: float | None = None


class RankError(RuntimeError):
    """A child rank raised; the message holds its exception type, message and traceback."""

    def __init__(self, outcome: RankOutcome):
        self.outcome = outcome
        self.rank = outcome.rank
        self.error_type = outcome.error_type
        super().__init__(f"rank {outcome.rank} raised {outcome.error_type}: {outcome.message}\n"
                         f"--- child traceback ---\n{outcome.traceback}")


def _child(fn, rank, world_size, port, backend, device, pg_timeout, args, results, env):
    start = time.monotonic()
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.environ.update(env or {})
    try:
        import torch

        torch.set_num_threads(1)  # W ranks on 2 cores: no oversubscription
        import cqil_kernels.distributed as cd

        ctx = cd.init(backend=backend, timeout=pg_timeout, device=device)
        try:
            value = fn(ctx, *args)
        finally:
            try:
                cd.destroy(ctx)
            except Exception:  # noqa: BLE001 - a broken group (the fault tests) cannot be torn down cleanly
                pass
        results.put((rank, "ok", value, None, None, None, time.monotonic() - start))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, "error", None, type(e).__name__, str(e), traceback.format_exc(), time.monotonic() - start))


def run_ranks(fn, world_size: int, *args, backend: str = "gloo", device=None, pg_timeout: float = 10.0,
              join_timeout: float = 60.0, grace: float = 2.0, expect_failure: bool = False,
              env: dict | None = None):
    """Run ``fn(ctx, *args)`` on ``world_size`` ranks; the list of per-rank return values.

    Args:
        backend: process-group backend passed to ``init``.
        device: the ranks' device passed to ``init`` (default: ``init``'s choice - the CPU for gloo).
        pg_timeout: process-group timeout (s) inside the ranks.
        join_timeout: the whole run must end within this many seconds.
        grace: once a rank has failed, how long the others may still take before termination.
        expect_failure: return the :class:`RankOutcome` list instead of raising on a child failure.
        env: extra environment variables for the children.

    Raises:
        RankError: a child raised (the lowest such rank), unless ``expect_failure``.
        TimeoutError: ranks still running at ``join_timeout`` (they are terminated first).
    """
    ctx = _mp_context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, backend, device, pg_timeout, args, results, env),
                         daemon=True) for r in range(world_size)]
    start = time.monotonic()
    for p in procs:
        p.start()
    outcomes: dict[int, RankOutcome] = {}
    deadline = start + join_timeout
    failed_at = None

    def drain(timeout: float) -> None:
        nonlocal failed_at
        while True:
            try:
                rank, status, value, etype, msg, tb, elapsed = results.get(timeout=timeout)
            except queue_module.Empty:
                return
            outcomes[rank] = RankOutcome(rank, status, value, etype, msg, tb, elapsed_s=elapsed)
            if status == "error" and failed_at is None:
                failed_at = time.monotonic()
            timeout = 0.01

    try:
        while len(outcomes) < world_size:
            now = time.monotonic()
            if now > deadline or (failed_at is not None and now > failed_at + grace):
                break
            drain(0.05)
            dead = [r for r, p in enumerate(procs) if r not in outcomes and p.exitcode is not None]
            if dead:
                drain(0.2)  # its result may still be in the pipe
                for r in dead:
                    if r not in outcomes:  # died without reporting (killed, os._exit, a crash)
                        outcomes[r] = RankOutcome(r, "exited", exitcode=procs[r].exitcode,
                                                  elapsed_s=time.monotonic() - start)
                        failed_at = failed_at or time.monotonic()
    finally:
        for p in procs:
            p.join(timeout=0.5 if failed_at is None else 0.1)
        for r, p in enumerate(procs):
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=2.0)
                if r not in outcomes:
                    outcomes[r] = RankOutcome(r, "terminated", exitcode=p.exitcode, elapsed_s=time.monotonic() - start)
            elif r not in outcomes:  # ended by itself while the others were being collected
                outcomes[r] = RankOutcome(r, "exited", exitcode=p.exitcode, elapsed_s=time.monotonic() - start)
        results.close()
    ordered = [outcomes[r] for r in range(world_size)]
    if expect_failure:
        return ordered
    errors = [o for o in ordered if o.status == "error"]
    if errors:
        raise RankError(errors[0])
    if any(o.status != "ok" for o in ordered):
        bad = [(o.rank, o.status, o.exitcode) for o in ordered if o.status != "ok"]
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks did not finish within {join_timeout:g} s: {bad}")
        raise RuntimeError(f"ranks ended without a result: {bad} (rank, status, exit code)")
    return [o.value for o in ordered]
