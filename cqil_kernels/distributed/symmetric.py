"""Symmetric-memory all-reduce: PyTorch's one-shot and two-shot kernels on pre-registered buffers.

``torch.distributed._symmetric_memory`` maps every rank's buffer into every other rank's address
space (NVLink peer access), so a small all-reduce is one kernel that reads the peers' buffers
directly: on H100 NVLink 3.7-7.8 us for decode-sized messages against 19-23 us for NCCL
(design.md section 4). The ops used (torch 2.13 schemas):

- ``torch.ops.symm_mem.one_shot_all_reduce_out(input, "sum", group_name, out)``: every rank reads
  all peers' ``input`` and writes the sum to its own ``out``; best for small messages.
- ``torch.ops.symm_mem.two_shot_all_reduce_(input, "sum", group_name)``: reduce-scatter then
  all-gather inside the buffer, in place; better once the message is large.

``input`` must live in a buffer from ``symm_mem.empty`` registered with ``symm_mem.rendezvous``
(a collective), so the buffers here are allocated once, before any CUDA-graph capture, and each
reduction stages its tensor into one. Both kernels sum the ranks in rank order, so every rank gets
bitwise the same result. They dispatch float32 and bfloat16 only, need sizes that are multiples of
4 bytes, and wait for peers by spinning without a timeout (see ``faults.wait_event``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SYMMETRIC_DTYPES", "SymmetricSupport", "probe", "SymmetricBuffers"]

# The dtypes the one-/two-shot kernels dispatch (AT_DISPATCH_FLOAT_AND_BFLOAT16 in PyTorch's
# CUDASymmetricMemoryOps.cu); fp16 goes through the process group instead.
SYMMETRIC_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class SymmetricSupport:
    """Whether symmetric-memory all-reduce can run here, and why (not)."""

    available: bool
    reason: str


def probe(device) -> SymmetricSupport:
    """Can this process use symmetric-memory all-reduce on ``device``? Touches no GPU memory.

    Checks: a CUDA device, ``torch.distributed._symmetric_memory`` importable, the one-/two-shot
    ops registered. Peer access is only known at ``SymmetricBuffers.reserve`` (rendezvous).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return SymmetricSupport(False, f"symmetric memory needs CUDA tensors, this rank computes on {device.type}")
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError as e:
        return SymmetricSupport(False, f"torch.distributed._symmetric_memory is not importable: {e}")
    for name in ("one_shot_all_reduce_out", "two_shot_all_reduce_"):
        try:
            getattr(torch.ops.symm_mem, name)
        except (AttributeError, RuntimeError):
            return SymmetricSupport(False, f"torch.ops.symm_mem.{name} is not registered in this torch build")
    return SymmetricSupport(True, "torch.distributed._symmetric_memory one-shot / two-shot all-reduce")


class SymmetricBuffers:
    """Registered staging buffers of one process group on one CUDA device, one per dtype.

    Args:
        group: the process group (``ProcessGroup``) whose ranks share the buffers.
        device: this rank's CUDA device.

    Every method that allocates (``reserve``) is a collective: all ranks call it with the same
    arguments in the same order. The reductions run on the caller's current stream; the caller
    (``Communicator``) issues all of them from one stream, as symmetric memory requires.
    """

    def __init__(self, group, device):
        self.group = group
        self.device = torch.device(device)
        self.group_name = group.group_name
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        self._handles: dict[torch.dtype, object] = {}

    def support(self) -> SymmetricSupport:
        return probe(self.device)

    def capacity(self, dtype: torch.dtype) -> int:
        """Largest reduction (elements of ``dtype``) the registered buffer takes; 0 without one."""
        buf = self._buffers.get(dtype)
        return 0 if buf is None else buf.numel()

    def reserve(self, max_numel: int, dtype: torch.dtype) -> None:
        """Allocate and rendezvous a buffer of ``max_numel`` elements of ``dtype`` (collective).

        A larger request replaces the old buffer; a smaller one keeps it. Never call it during
        CUDA-graph capture (the caller checks).
        """
        if max_numel <= self.capacity(dtype):
            return
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(max_numel, dtype=dtype, device=self.device)
        handle = symm_mem.rendezvous(buf, self.group)
        self._buffers[dtype], self._handles[dtype] = buf, handle

    def _stage(self, t: torch.Tensor) -> torch.Tensor:
        staged = self._buffers[t.dtype][: t.numel()].view(t.shape)
        staged.copy_(t)
        return staged

    def one_shot_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` (contiguous, on ``device``) over the ranks in place with the one-shot kernel."""
        staged = self._stage(t)
        torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, t)
        return t

    def two_shot_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks in place with the two-shot kernel (in the buffer, then copied back)."""
        staged = self._stage(t)
        torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group_name)
        t.copy_(staged)
        return t
