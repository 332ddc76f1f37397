"""Per-layer weight tables: how one kernel launch reads the P layers' own, separate weights.

A group's grouped GEMMs read a weight family (q/k/v, o_proj, gate, up, down, norms) of P layers in
one launch, but each layer keeps its own parameter tensor (nothing is stacked or aliased: savers
see ordinary, unshared tensors). As in Triton's grouped-GEMM tutorial, the kernel finds layer j's
weight through a small device table; here the table holds each tensor's *element offset* from the
first one (``base``), so the kernel does plain pointer arithmetic ``base + off[j] + row * stride``
(no int-to-pointer casts; the interpreter runs the same code on the CPU).

Tables are cached by the tensors' current addresses: the same addresses always give the same
offsets, so a cached table can never be stale, and re-allocated parameters (``model.to()``,
``load_state_dict(assign=True)``) simply get a new table. Building one copies a few bytes to the
device, which a CUDA-graph capture forbids: callers run their step once eagerly before capturing
(the decode engine does), and a table first needed during capture raises a clear error.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["WeightTable", "weight_table", "check_same_layout", "as_op_list", "from_op_list"]

# Offsets a multiple of this many elements (and 16-byte aligned addresses) let the kernel promise
# alignment to the compiler (``tl.multiple_of``), which keeps vectorised / async-copy loads.
ALIGN_ELEMENTS = 8


class WeightTable:
    """Device table of element offsets of ``tensors`` from ``base`` (= tensors[0]).

    Attributes:
        base: the first tensor (its pointer is the kernel's base pointer).
        offsets: int64 [len(tensors)] on the tensors' device.
        aligned: every address is 16-byte aligned and every offset a multiple of ALIGN_ELEMENTS.
    """

    __slots__ = ("base", "offsets", "aligned")

    def __init__(self, base: torch.Tensor, offsets: torch.Tensor, aligned: bool):
        self.base = base
        self.offsets = offsets
        self.aligned = aligned


_CACHE: dict = {}
_LOCK = threading.Lock()


def check_same_layout(tensors, what: str) -> None:
    """Every tensor has the shape, strides, dtype and device of the first (a table's premise)."""
    if not tensors:
        raise ValueError(f"{what}: empty weight list")
    t0 = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, not a tensor")
        if t.shape != t0.shape or t.stride() != t0.stride() or t.dtype != t0.dtype or t.device != t0.device:
            raise ValueError(
                f"{what}[{i}] is {tuple(t.shape)} stride {t.stride()} {t.dtype} on {t.device}; "
                f"{what}[0] is {tuple(t0.shape)} stride {t0.stride()} {t0.dtype} on {t0.device}: "
                "one kernel launch needs one layout"
            )


def weight_table(tensors) -> WeightTable:
    """The (cached) table of ``tensors`` for one launch; they must share dtype and device.

    Shapes may differ (q, k and v of a layer); strides are the caller's business.
    """
    t0 = tensors[0]
    size = t0.element_size()
    ptrs = tuple(t.data_ptr() for t in tensors)
    key = (t0.device, t0.dtype, ptrs)
    table = _CACHE.get(key)
    if table is not None:
        return WeightTable(t0, table[0], table[1])
    for i, t in enumerate(tensors):
        if t.dtype != t0.dtype or t.device != t0.device:
            raise ValueError(f"weight {i} is {t.dtype} on {t.device}, weight 0 is {t0.dtype} on {t0.device}")
    deltas = [p - ptrs[0] for p in ptrs]
    if any(d % size for d in deltas):  # pragma: no cover - allocators align to the element size
        raise ValueError("weights are not element-aligned with each other")
    offsets = [d // size for d in deltas]
    aligned = all(p % 16 == 0 for p in ptrs) and all(o % ALIGN_ELEMENTS == 0 for o in offsets)
    if t0.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "a weight table is needed for the first time inside a CUDA-graph capture; run the step once "
            "eagerly before capturing (cqil_kernels.DecodeEngine does), so the table exists already"
        )
    dev = torch.tensor(offsets, dtype=torch.int64).to(t0.device)
    with _LOCK:
        # Entries are a few bytes and never evicted: a captured graph may still read an old table.
        _CACHE[key] = (dev, aligned)
    return WeightTable(t0, dev, aligned)


def as_op_list(tensors) -> list:
    """A weight list for a custom op: ``torch.library`` schemas have no optional list, so None
    (e.g. no biases) travels as an empty list."""
    return [] if tensors is None else list(tensors)


def from_op_list(tensors):
    """Inverse of :func:`as_op_list`: an empty list means None."""
    return list(tensors) if tensors else None
