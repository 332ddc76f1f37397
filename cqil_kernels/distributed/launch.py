"""Starting and ending a multi-process run: the torchrun environment, the process group, the device.

``torchrun --standalone --nproc-per-node=W ...`` starts W processes and gives each RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. :func:`init` reads them, picks NCCL when the
ranks compute on CUDA and gloo on the CPU, sets a process-group timeout (so a dead or hung peer
ends the others with an error instead of a hang) and, on CUDA, binds the process to
``cuda:LOCAL_RANK``. Without torchrun (none of the variables set) it returns a one-process context
and creates no process group: the ordinary single-device path.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Mapping

import torch

__all__ = ["DEFAULT_TIMEOUT_S", "LaunchEnv", "DistContext", "init", "destroy"]

# Long enough for a slow first collective (NCCL communicator set-up, a rank still loading
# weights), short enough that a dead peer is reported in under a minute.
DEFAULT_TIMEOUT_S = 30.0

_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_ALL = _REQUIRED + ("LOCAL_RANK",)


@dataclass(frozen=True)
class LaunchEnv:
    """The launcher's view of this process (torchrun's environment variables, parsed and checked).

    ``local_rank`` defaults to ``rank`` when LOCAL_RANK is missing (one node).
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "LaunchEnv | None":
        """Parse ``environ`` (default ``os.environ``); None when no launcher variable is set.

        Raises:
            ValueError: some but not all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are set, a
                value is not an integer, or RANK / LOCAL_RANK is out of range.
        """
        env = os.environ if environ is None else environ
        present = [k for k in _ALL if env.get(k, "") != ""]
        if not present:
            return None
        missing = [k for k in _REQUIRED if env.get(k, "") == ""]
        if missing:
            raise ValueError(
                f"incomplete launcher environment: {', '.join(present)} set but {', '.join(missing)} missing; "
                "start the processes with torchrun (e.g. torchrun --standalone --nproc-per-node=2 ...) or "
                f"set all of {', '.join(_REQUIRED)} (LOCAL_RANK optional), or none of them for one process"
            )

        def integer(key: str, default: int | None = None) -> int:
            raw = env.get(key, "")
            if raw == "" and default is not None:
                return default
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{key}={raw!r} is not an integer") from None

        world_size = integer("WORLD_SIZE")
        rank = integer("RANK")
        local_rank = integer("LOCAL_RANK", default=rank)
        port = integer("MASTER_PORT")
        if world_size < 1:
            raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK must be in 0..{world_size - 1} for WORLD_SIZE={world_size}, got {rank}")
        if not 0 <= local_rank < world_size:
            raise ValueError(f"LOCAL_RANK must be in 0..{world_size - 1}, got {local_rank}")
        if not 0 < port < 65536:
            raise ValueError(f"MASTER_PORT must be a TCP port 1..65535, got {port}")
        return cls(rank=rank, world_size=world_size, local_rank=local_rank,
                   master_addr=env["MASTER_ADDR"], master_port=port)


@dataclass(frozen=True)
class DistContext:
    """What :func:`init` set up; also a context manager that calls :func:`destroy` on exit.

    Attributes:
        rank, world_size, local_rank: this process in the run (0, 1, 0 for one process).
        device: where this rank computes (``cuda:LOCAL_RANK`` on CUDA machines, else the CPU).
        backend: "nccl" or "gloo"; None for one process.
        group: the process group for the collectives; None for one process (no communication).
        timeout_s: the process-group timeout: a collective waiting longer for a peer raises.
        owns_group: :func:`destroy` ends the group only when :func:`init` created it.

    Example:
        >>> with cqil_kernels.distributed.init() as ctx:
        ...     if ctx.is_main:
        ...         print(ctx.world_size)
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    group: object | None
    timeout_s: float
    owns_group: bool

    @property
    def distributed(self) -> bool:
        """True when several processes take part (there is a process group)."""
        return self.group is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes reports."""
        return self.rank == 0

    def __enter__(self) -> "DistContext":
        return self

    def __exit__(self, *exc) -> None:
        destroy(self)


def _timeout_seconds(timeout) -> float:
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _resolve_device(device, backend: str | None, local_rank: int) -> torch.device:
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    elif backend == "gloo" or not torch.cuda.is_available():
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(
                f"rank with LOCAL_RANK {local_rank} wants {device} but this machine has {count} CUDA device(s): "
                "start at most one process per GPU (NCCL refuses two ranks on one GPU), or pass "
                "backend='gloo' and device='cuda:0' to share one GPU through gloo"
            )
    return device


def _resolve_backend(backend: str | None, device: torch.device) -> str:
    if backend is None:
        return "nccl" if device.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None (automatic), got {backend!r}")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend 'nccl' needs CUDA devices, but this rank computes on {device}; use 'gloo'")
    return backend


def init(backend: str | None = None, timeout=DEFAULT_TIMEOUT_S, device=None) -> DistContext:
    """Join the run torchrun started, or return a one-process context when there is none.

    Args:
        backend: "nccl", "gloo" or None: NCCL when the ranks compute on CUDA, gloo on the CPU.
        timeout: process-group timeout in seconds (or a ``timedelta``): forming the group and every
            collective raise when a peer is missing for longer. gloo enforces it per collective;
            NCCL through its watchdog, which (with PyTorch's default ``TORCH_NCCL_ASYNC_ERROR_HANDLING``)
            ends the process.
        device: where this rank computes; default ``cuda:LOCAL_RANK`` when CUDA is available (CPU
            with ``backend="gloo"``). On CUDA it becomes the current device.

    Returns:
        A :class:`DistContext` (``group`` None for one process). When a default process group
        already exists it is reused as is (``owns_group`` False: ``destroy`` leaves it alone, and
        ``backend`` / ``timeout`` of this call do not apply).

    Raises:
        ValueError: half-set launcher variables, an unknown backend, NCCL without CUDA, more local
            ranks than GPUs.
        RuntimeError: the group could not be formed within ``timeout`` (a peer never started).
    """
    import torch.distributed as dist

    timeout_s = _timeout_seconds(timeout)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        env = LaunchEnv.from_environ()
        local_rank = env.local_rank if env is not None else rank
        dev = _resolve_device(device, dist.get_backend(), local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(rank, world, local_rank, dev, str(dist.get_backend()), dist.group.WORLD,
                           timeout_s, owns_group=False)

    env = LaunchEnv.from_environ()
    if env is None or env.world_size == 1:
        local_rank = 0 if env is None else env.local_rank
        dev = _resolve_device(device, backend, local_rank)
        if backend is not None:
            _resolve_backend(backend, dev)  # same errors as a multi-process run
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(0, 1, local_rank, dev, None, None, timeout_s, owns_group=False)

    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; a multi-process run is impossible")
    dev = _resolve_device(device, backend, env.local_rank)
    chosen = _resolve_backend(backend, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kwargs = {}
    if chosen == "nccl":
        kwargs["device_id"] = dev  # form the NCCL communicator now: errors here, not at the first use
    try:
        # env:// (not our own TCPStore): under torchrun it joins the agent's store
        dist.init_process_group(backend=chosen, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    except (RuntimeError, OSError) as e:
        raise RuntimeError(
            f"rank {env.rank} could not form the {chosen} process group of {env.world_size} ranks at "
            f"{env.master_addr}:{env.master_port} within {timeout_s:g} s (did every rank start?): {e}"
        ) from e
    return DistContext(env.rank, env.world_size, env.local_rank, dev, chosen, dist.group.WORLD, timeout_s,
                       owns_group=True)


def destroy(ctx: DistContext | None = None) -> None:
    """End the process group ``init`` created (no-op for one process or a reused group).

    ``ctx=None`` ends the default group if one exists, whoever created it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if ctx is None or ctx.owns_group:
        dist.destroy_process_group()
