"""The collectives of a split CQIL group: one all-reduce per group, an all-gather for the bypass.

A :class:`Communicator` belongs to one process group on one device and runs every collective of
the distributed forward through the engines that exist - no hand-written collective:

- ``process_group``: ``torch.distributed.all_reduce`` / ``all_gather_single`` of the group's
  backend (NCCL on GPUs, gloo on the CPU);
- ``symm_one_shot`` / ``symm_two_shot``: PyTorch's symmetric-memory kernels (``symmetric.py``) on
  CUDA, on buffers registered by :meth:`Communicator.prepare` before any CUDA-graph capture.

``choose_engine`` (pure, tested on the CPU) picks per tensor: symmetric memory when it is
available on every rank, prepared for the dtype and large enough; one-shot up to
``ReducePolicy.one_shot_max_bytes``, two-shot above; otherwise the process group. With one
process (``group=None``) every collective is the identity: the single-device path is the case
"this process holds every layer".

CUDA graphs: NCCL collectives and the symmetric-memory kernels can be captured, gloo cannot (it
runs on the host; capture is refused with an error). Every rank must capture the same sequence of
collectives - same ops, sizes, dtypes and order - and replay its graphs in the same order as the
others: a collective captured or replayed on one rank only waits forever for its peers (then the
NCCL watchdog ends the run at the process-group timeout; a symmetric-memory kernel just spins).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .faults import collective_guard
from .symmetric import SYMMETRIC_DTYPES, SymmetricBuffers, SymmetricSupport, probe

__all__ = ["ENGINES", "ReducePolicy", "Choice", "choose_engine", "Handle", "Communicator"]

ENGINES = ("process_group", "symm_one_shot", "symm_two_shot")


@dataclass(frozen=True)
class ReducePolicy:
    """How a :class:`Communicator` picks its all-reduce engine.

    Args:
        engine: "auto" (by message size, with fallback), or one of ``ENGINES`` to force it (a
            forced symmetric engine that cannot take a tensor raises instead of falling back).
        one_shot_max_bytes: largest message for the one-shot kernel; larger ones use two-shot.
            The default is the one-shot/two-shot switch of PyTorch's intra-node all-reduce
            (``kOneShotThreshBytes``, 256 KiB): one-shot moves W times the data but has one sync.
    """

    engine: str = "auto"
    one_shot_max_bytes: int = 256 * 1024

    def __post_init__(self):
        if self.engine not in ("auto",) + ENGINES:
            raise ValueError(f"engine must be 'auto' or one of {ENGINES}, got {self.engine!r}")
        if isinstance(self.one_shot_max_bytes, bool) or not isinstance(self.one_shot_max_bytes, int) \
                or self.one_shot_max_bytes < 0:
            raise ValueError(f"one_shot_max_bytes must be an int >= 0, got {self.one_shot_max_bytes!r}")


class Choice(NamedTuple):
    """An engine and why it was chosen (or why symmetric memory was not)."""

    engine: str  # "none" (one process) or one of ENGINES
    reason: str


def _symmetric_obstacle(numel: int, dtype: torch.dtype, support: SymmetricSupport | None, capacity: int) -> str | None:
    if support is None:
        return "prepare() was not called"
    if not support.available:
        return support.reason
    if dtype not in SYMMETRIC_DTYPES:
        return f"{dtype} is not one of the symmetric-memory dtypes {[str(d) for d in SYMMETRIC_DTYPES]}"
    nbytes = numel * dtype.itemsize
    if nbytes % 4:
        return f"{nbytes} bytes is not a multiple of 4 (the kernels' minimum alignment)"
    if capacity == 0:
        return f"no symmetric buffer prepared for {dtype}"
    if numel > capacity:
        return f"{numel} elements exceed the prepared buffer of {capacity}"
    return None


def choose_engine(numel: int, dtype: torch.dtype, *, world_size: int, support: SymmetricSupport | None,
                  capacity: int, policy: ReducePolicy) -> Choice:
    """The all-reduce engine for a tensor of ``numel`` elements of ``dtype``.

    Args:
        world_size: ranks in the group (1: nothing to reduce).
        support: what ``prepare`` found on every rank (None: not prepared; ``symmetric.probe``
            reports CPU devices as unavailable).
        capacity: elements of ``dtype`` the prepared symmetric buffer takes (0: none).
        policy: the :class:`ReducePolicy`.

    Raises:
        ValueError: the policy forces a symmetric engine that cannot take this tensor.

    Example:
        >>> ok = SymmetricSupport(True, "test")
        >>> choose_engine(4096, torch.bfloat16, world_size=2, support=ok, capacity=1 << 20,
        ...               policy=ReducePolicy()).engine
        'symm_one_shot'
    """
    if world_size == 1:
        return Choice("none", "one process: nothing to reduce")
    if policy.engine == "process_group":
        return Choice("process_group", "forced by the policy")
    obstacle = _symmetric_obstacle(numel, dtype, support, capacity)
    if policy.engine != "auto":
        if obstacle is not None:
            raise ValueError(f"the policy forces {policy.engine!r}, which cannot reduce this tensor: {obstacle}")
        return Choice(policy.engine, "forced by the policy")
    if obstacle is not None:
        return Choice("process_group", obstacle)
    nbytes = numel * dtype.itemsize
    if nbytes <= policy.one_shot_max_bytes:
        return Choice("symm_one_shot", f"{nbytes} bytes <= {policy.one_shot_max_bytes}")
    return Choice("symm_two_shot", f"{nbytes} bytes > {policy.one_shot_max_bytes}")


def _is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@dataclass
class Handle:
    """An issued collective; :meth:`wait` returns its result once it may be used.

    On CUDA ``wait`` makes the caller's current stream wait (the host does not block); with gloo
    it blocks the host. Keep the handle (it keeps the tensors alive) and wait before reading,
    overwriting or dropping them.
    """

    result: torch.Tensor
    _work: object = None
    _event: object = None
    _what: object = None
    _rank: int | None = None
    _timeout_s: float | None = None
    _done: bool = field(default=False, repr=False)

    def wait(self) -> torch.Tensor:
        if not self._done:
            if self._work is not None:
                with collective_guard(self._what, self._rank, self._timeout_s):
                    self._work.wait()
            if self._event is not None:
                torch.cuda.current_stream(self.result.device).wait_event(self._event)
            self._done = True
        return self.result


class Communicator:
    """Collectives of one process group on one device (see the module docstring for the engines).

    Args:
        group: a ``torch.distributed`` process group, or None for one process (every collective
            is then the identity).
        device: this rank's device (the tensors' device).
        policy: a :class:`ReducePolicy` (default: automatic engine choice).
        symmetric: the symmetric-buffer provider (default: ``SymmetricBuffers`` when ``probe``
            allows); an object with ``support()``, ``capacity(dtype)``, ``reserve(numel, dtype)``,
            ``one_shot_(t)`` and ``two_shot_(t)``.
        timeout_s: the process-group timeout, quoted in error messages.

    Example:
        >>> comm = Communicator.from_context(cqil_kernels.distributed.init())
        >>> comm.prepare(max_numel=8 * 4096, dtype=torch.bfloat16)   # before any graph capture
        >>> comm.all_reduce_(partial)            # [M, H] summed over the ranks, in place
        >>> attn = comm.all_gather(local_attn)   # [P/W, M, H] per rank -> [P, M, H] in layer order
    """

    def __init__(self, group=None, device="cpu", policy: ReducePolicy | None = None, *, symmetric=None,
                 timeout_s: float | None = None):
        self.group = group
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.policy = ReducePolicy() if policy is None else policy
        if not isinstance(self.policy, ReducePolicy):
            raise TypeError(f"policy must be a ReducePolicy, got {type(policy).__name__}")
        self.timeout_s = timeout_s
        if group is None:
            self.world_size, self.rank, self.backend = 1, 0, None
        else:
            import torch.distributed as dist

            self.world_size = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
            self.backend = str(dist.get_backend(group))
        self._symmetric = symmetric
        self._support: SymmetricSupport | None = None
        self._stream = None  # the one CUDA stream every symmetric-memory collective is issued from

    @classmethod
    def from_context(cls, ctx, policy: ReducePolicy | None = None, **kwargs) -> "Communicator":
        """The communicator of a ``DistContext`` from ``init()`` (its group, device and timeout)."""
        return cls(ctx.group, ctx.device, policy, timeout_s=ctx.timeout_s, **kwargs)

    @property
    def _uses_nccl(self) -> bool:
        # "nccl", or a combined backend such as "cpu:gloo,cuda:nccl" (CUDA tensors go to NCCL)
        return self.backend is not None and "nccl" in self.backend and self.device.type == "cuda"

    @property
    def trivial(self) -> bool:
        """One process: every collective is the identity."""
        return self.world_size == 1

    # ------------------------------------------------------------------ preparation
    def prepare(self, max_numel: int, dtype: torch.dtype, device=None) -> Choice:
        """Register symmetric buffers for reductions of up to ``max_numel`` elements of ``dtype``.

        A collective (every rank calls it with the same arguments, in the same order) and a
        host-side allocation: call it before any CUDA-graph capture, once per dtype the forward
        reduces. Where symmetric memory is unavailable on any rank (the ranks agree first), or
        for a dtype it does not take, nothing is allocated and reductions use the process group.

        Returns:
            The engine a reduction of ``max_numel`` elements would now use.

        Raises:
            RuntimeError: called during CUDA-graph capture.
            ValueError: bad arguments, or a forced symmetric policy that cannot be met.
        """
        if _is_capturing(self.device):
            raise RuntimeError(
                "Communicator.prepare() was called during CUDA-graph capture: symmetric-memory buffers must be "
                "allocated and rendezvoused before capture (an allocation inside a capture corrupts results); "
                "call prepare() first, then capture"
            )
        if isinstance(max_numel, bool) or not isinstance(max_numel, int) or max_numel < 1:
            raise ValueError(f"max_numel must be an int >= 1, got {max_numel!r}")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        if device is not None and torch.device(device) != self.device:
            raise ValueError(f"this communicator serves {self.device}, not {torch.device(device)}")
        if not self.trivial and self.policy.engine != "process_group":
            self._prepare_symmetric(max_numel, dtype)
        return self._choose(max_numel, dtype)

    def _prepare_symmetric(self, max_numel: int, dtype: torch.dtype) -> None:
        if dtype not in SYMMETRIC_DTYPES:
            return  # the same on every rank (same arguments): no agreement needed; choose_engine says why
        if self._symmetric is None:
            local = probe(self.device)
            if local.available:
                self._symmetric = SymmetricBuffers(self.group, self.device)
        else:
            local = self._symmetric.support()
        # Every rank must take the same path (rendezvous is a collective): agree first.
        if not self._all_agree(local.available):
            if self._support is None or not self._support.available:  # keep buffers registered earlier
                why = local.reason if not local.available else "symmetric memory is unavailable on another rank"
                self._support = SymmetricSupport(False, why)
            return
        error = None
        try:
            self._symmetric.reserve(max_numel, dtype)
        except Exception as e:  # noqa: BLE001 - any failure to register means: fall back, on every rank
            error = e
        if not self._all_agree(error is None):
            self._support = SymmetricSupport(False, f"registering symmetric buffers failed: {error or 'on another rank'}")
            return
        self._support = local
        if self.device.type == "cuda" and self._stream is None:
            self._stream = torch.cuda.Stream(self.device)

    def _all_agree(self, flag: bool) -> bool:
        import torch.distributed as dist

        where = self.device if self._uses_nccl else torch.device("cpu")
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=where)
        with collective_guard("agreement on symmetric memory", self.rank, self.timeout_s):
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    # ------------------------------------------------------------------ choice
    def _capacity(self, dtype) -> int:
        if self._symmetric is None or self._support is None or not self._support.available:
            return 0
        return self._symmetric.capacity(dtype)

    def _choose(self, numel: int, dtype: torch.dtype) -> Choice:
        return choose_engine(numel, dtype, world_size=self.world_size, support=self._support,
                             capacity=self._capacity(dtype), policy=self.policy)

    def engine_for(self, t: torch.Tensor) -> Choice:
        """The engine ``all_reduce_(t)`` would use, and why."""
        return self._choose(t.numel(), t.dtype)

    # ------------------------------------------------------------------ collectives
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (every rank gets the bitwise-same result); returns ``t``.

        ``t``: contiguous, on this communicator's device, any shape (e.g. a group's summed
        deltas ``[M, H]``). The one reduction per split group. A collective: every rank calls it
        with the same shape and dtype, in the same order - also when capturing a CUDA graph, where
        every rank must capture the same sequence of collectives and replay it in the same order.
        """
        return self.all_reduce_async_(t).wait()

    def all_reduce_async_(self, t: torch.Tensor) -> Handle:
        """Issue the in-place sum of ``t`` and return at once; ``handle.wait()`` returns ``t``.

        On CUDA the reduction runs on a communication stream (NCCL's own, or this communicator's
        stream for symmetric memory) after the work already queued on the current stream;
        ``wait()`` orders the current stream after it. With gloo the host work runs in gloo's
        threads and ``wait()`` blocks. Do not touch ``t`` before ``wait()``.
        """
        if self.trivial:
            return Handle(t, _done=True)
        self._check(t, "all_reduce_")
        engine = self.engine_for(t).engine
        if engine == "process_group":
            import torch.distributed as dist

            self._refuse_host_collective_in_capture("all_reduce")
            what = lambda: f"all_reduce of {t.numel()} {t.dtype} elements"  # noqa: E731
            with collective_guard(what, self.rank, self.timeout_s):
                work = dist.all_reduce(t, group=self.group, async_op=True)
            return Handle(t, work, None, what, self.rank, self.timeout_s)
        reduce_ = self._symmetric.one_shot_ if engine == "symm_one_shot" else self._symmetric.two_shot_
        if t.device.type != "cuda":  # only a test double serves CPU tensors
            reduce_(t)
            return Handle(t, _done=True)
        # All symmetric-memory collectives from one stream, ordered after the producer's work.
        current = torch.cuda.current_stream(t.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            reduce_(t)
        done = torch.cuda.Event()
        done.record(self._stream)
        return Handle(t, None, done)

    def all_gather(self, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Concatenate every rank's ``t`` along dim 0, in rank order: ``[n, ...]`` -> ``[W*n, ...]``.

        For the bypass across ranks: each rank's attention outputs of its P/W layers
        ``[P/W, M, H]`` become the group's ``[P, M, H]`` in layer order (contiguous placement).
        ``out``: a preallocated result (static buffers for graphs); with one process and no
        ``out``, ``t`` itself is returned.
        """
        return self.all_gather_async(t, out).wait()

    def all_gather_async(self, t: torch.Tensor, out: torch.Tensor | None = None) -> Handle:
        """The all-gather issued without waiting; ``handle.wait()`` returns the gathered tensor."""
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise ValueError("all_gather needs a tensor with at least one dimension (gathered along dim 0)")
        shape = (self.world_size * t.shape[0], *t.shape[1:])
        if out is not None:
            if tuple(out.shape) != shape or out.dtype != t.dtype or out.device != t.device or not out.is_contiguous():
                raise ValueError(
                    f"out must be a contiguous {t.dtype} tensor of shape {list(shape)} on {t.device}, got "
                    f"{out.dtype} {list(out.shape)} on {out.device}"
                )
        if self.trivial:
            if out is None:
                return Handle(t, _done=True)
            out.copy_(t)
            return Handle(out, _done=True)
        self._check(t, "all_gather")
        if out is None:
            out = torch.empty(shape, dtype=t.dtype, device=t.device)
        import torch.distributed as dist

        self._refuse_host_collective_in_capture("all_gather")
        # all_gather_single is torch 2.13's name; all_gather_into_tensor before it
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        what = lambda: f"all_gather of {t.numel()} {t.dtype} elements"  # noqa: E731
        with collective_guard(what, self.rank, self.timeout_s):
            work = gather(out, t, group=self.group, async_op=True)
        return Handle(out, work, None, what, self.rank, self.timeout_s)

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``t`` on every rank with rank ``src``'s ``t`` (e.g. tokens sampled on rank 0)."""
        if self.trivial:
            return t
        self._check(t, "broadcast_")
        import torch.distributed as dist

        self._refuse_host_collective_in_capture("broadcast")
        with collective_guard(lambda: f"broadcast from rank {src}", self.rank, self.timeout_s):
            dist.broadcast(t, src=dist.get_global_rank(self.group, src), group=self.group)
        return t

    # ------------------------------------------------------------------ checks, report
    def _check(self, t, op: str) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op} needs a torch.Tensor, got {type(t).__name__}")
        if t.device != self.device:
            raise ValueError(f"{op}: tensor on {t.device}, but this communicator serves {self.device}")
        if not t.is_contiguous():
            raise ValueError(f"{op} needs a contiguous tensor (got strides {t.stride()} for shape {list(t.shape)})")

    def _refuse_host_collective_in_capture(self, op: str) -> None:
        if not self._uses_nccl and _is_capturing(self.device):
            raise RuntimeError(
                f"{op} through {self.backend} cannot be captured in a CUDA graph (gloo runs on the host); "
                "use the NCCL backend, prepared symmetric memory, or run this step without a graph"
            )

    def describe(self) -> dict:
        """Plain data for reports: world size, backend, policy, symmetric-memory state."""
        sym = None
        if self._support is not None:
            sym = {"available": self._support.available, "reason": self._support.reason}
            if self._support.available:
                sym["capacity"] = {str(d): self._symmetric.capacity(d) for d in SYMMETRIC_DTYPES
                                   if self._symmetric.capacity(d)}
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "backend": self.backend,
            "device": str(self.device),
            "policy": {"engine": self.policy.engine, "one_shot_max_bytes": self.policy.one_shot_max_bytes},
            "symmetric_memory": sym,
        }
