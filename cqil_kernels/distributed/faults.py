"""A dead or hung rank ends the others with a clear error within a bounded time, never a hang.

What bounds the wait (measured with gloo on CPU, torch 2.13; NCCL behaviour from its docs):

- a rank that exits: gloo peers fail at once on their next collective ("Connection closed by
  peer"); NCCL peers at the process-group timeout (the watchdog then ends the process).
- a rank that hangs: every collective of the others raises at the process-group timeout
  (``init(timeout=...)``). :func:`check_alive` (gloo's ``monitored_barrier``) names the rank.
- symmetric-memory all-reduces wait for peers by spinning on the GPU, with no timeout: a host that
  waits for such work should use :func:`wait_event` with a deadline.

:func:`collective_guard` turns the backend's errors into :class:`DistributedError` with the
operation, this rank, the timeout and what the backend said.
"""

from __future__ import annotations

import contextlib
import datetime
import time

__all__ = ["DistributedError", "collective_guard", "check_alive", "wait_event"]


class DistributedError(RuntimeError):
    """A collective failed because a peer rank died, hung, or the group was torn down."""


def _diagnosis(message: str, timeout_s: float | None) -> str:
    text = message.lower()
    if "failed to pass monitoredbarrier" in text:
        return "a peer rank did not reach the barrier in time"
    if "connection closed by peer" in text or "connection reset" in text or "broken pipe" in text:
        return "a peer rank exited (its connection closed)"
    if "timed out" in text or "timeout" in text:
        limit = f" of {timeout_s:g} s" if timeout_s else ""
        return f"a peer rank did not answer within the process-group timeout{limit} (hung, or much slower)"
    return "a peer rank failed or the process group was torn down"


@contextlib.contextmanager
def collective_guard(what, rank: int | None = None, timeout_s: float | None = None):
    """Re-raise errors of the torch.distributed calls inside as :class:`DistributedError`.

    Args:
        what: the operation, for the message (e.g. "all_reduce of 4096 float32 elements"), or a
            function returning it (formatted only on error: the guard sits on the hot path).
        rank: this process's rank, for the message.
        timeout_s: the process-group timeout, for the message.
    """
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:  # DistBackendError, DistStoreError, gloo's RuntimeErrors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        who = f"rank {rank}: " if rank is not None else ""
        what = what() if callable(what) else what
        raise DistributedError(f"{who}{what} failed: {_diagnosis(str(e), timeout_s)}. Backend said: {first}") from e


def check_alive(group, timeout_s: float, rank: int | None = None) -> None:
    """Barrier that fails within ``timeout_s`` when a rank does not arrive, naming it where it can.

    gloo: ``monitored_barrier`` (rank 0 reports which rank failed to arrive; the others see their
    connection to rank 0 fail). Other backends: a plain barrier, bounded by the process-group
    timeout. Collective: every rank of ``group`` must call it. ``group=None`` (one process): no-op.

    Raises:
        DistributedError: a rank did not arrive in time or is gone.
    """
    if group is None:
        return
    import torch.distributed as dist

    with collective_guard("liveness barrier", rank, timeout_s):
        if dist.get_backend(group) == "gloo":
            dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
        else:
            dist.barrier(group=group)


def wait_event(event, timeout_s: float, what: str = "GPU work", poll_s: float = 1e-4) -> None:
    """Block the host until CUDA ``event`` completes, raising after ``timeout_s`` seconds.

    For work without a timeout of its own (symmetric-memory collectives spin until every peer
    arrives): polling ``event.query()`` against a deadline turns a peer's hang into an error.
    The spinning kernel itself cannot be cancelled: after the error the process should exit.

    Raises:
        DistributedError: the event did not complete in time.
    """
    deadline = time.monotonic() + timeout_s
    while not event.query():
        if time.monotonic() > deadline:
            raise DistributedError(
                f"{what} did not complete within {timeout_s:g} s: a peer rank is probably dead or hung "
                "(symmetric-memory collectives wait for every peer without a timeout); exit this process"
            )
        time.sleep(poll_s)
