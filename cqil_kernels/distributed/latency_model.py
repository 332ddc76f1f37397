"""Modeled ms per step of a CQIL plan on W devices, from one-device segment times and all-reduce costs.

With ``c_k`` the measured one-device time of a k-layer segment (a CQIL group of k layers run by
the engine; k = 1 is a plain layer), U layers outside split groups and ``t_AR`` the all-reduce
time of one group's output, a step on W ranks costs (design.md section 4)

    T = t_embed_head + U * c_1 + sum_groups (c_{P/W} + t_AR)

(W = 1: every group costs ``c_P`` and there is no reduction). With two micro-batches (batch >= 2,
or a prefill split in two) the reduction of one overlaps the compute of the other. That is
modeled by running the schedule: one in-order compute stream (segment s of micro-batch A, then of
B, then segment s+1 ...), one in-order communication stream (the reductions), and a segment
starting only when its input - the previous segment's output, reduced if that was a split group -
is ready. In steady state a group then costs ``max(c'_h + max(c'_h, t'_h), 2 t'_h)`` with
half-batch values (primed), which at decode sizes (c flat in the batch) is worse than no overlap:
overlap pays off once the segment is compute-bound (prefill).

Pure arithmetic: the inputs are measured elsewhere (``benchmarks/multi_gpu_model.py`` times the
engine and reads the all-reduce table of ``benchmarks/allreduce_latency.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["AllReduceCost", "SegmentCosts", "segments_of", "modeled_step", "FORMULA", "OVERLAP_SCHEDULE"]

FORMULA = "T = t_embed_head + U * c_1 + sum_groups (c_{P/W} + t_AR(bytes)); W = 1: groups cost c_P, no t_AR"
OVERLAP_SCHEDULE = (
    "two micro-batches with half-batch costs c'_k, t'_AR: in-order compute stream (A_s, B_s, A_s+1, ...), "
    "in-order communication stream (AR_A_s, AR_B_s, ...), segment s+1 of a micro-batch starts when its "
    "input is ready (reduced after a split group); T = t_embed_head + finish of the last reduction/segment"
)


@dataclass(frozen=True)
class AllReduceCost:
    """All-reduce time of a message: a fixed latency plus, optionally, a bandwidth term.

    ``time = latency + bytes * 2 (W-1)/W / busbw`` (nccl-tests' bus-bandwidth convention);
    without ``busbw_gbps`` the latency alone (decode-sized messages).

    Attributes:
        latency_ms: small-message time, ms.
        busbw_gbps: large-message bus bandwidth, GB/s (1e9 bytes/s); None: latency only.
        source: where the numbers come from (measured here, or a publication).
    """

    latency_ms: float
    busbw_gbps: float | None = None
    source: str = ""

    def time_ms(self, nbytes: int, world_size: int) -> float:
        if world_size <= 1:
            return 0.0
        if self.busbw_gbps is None:
            return self.latency_ms
        return self.latency_ms + nbytes * 2 * (world_size - 1) / world_size / (self.busbw_gbps * 1e9) * 1e3


@dataclass(frozen=True)
class SegmentCosts:
    """One-device times (ms) of the pieces of a step, at one batch/token count.

    Attributes:
        c: ``k -> ms`` of a k-layer segment (k = 1: a plain layer; k = P: a CQIL group of P).
        t_embed_head: embedding + final norm + LM head (+ the step's fixed overhead), ms.
        source: how they were obtained (measured on which device, or derived from which anchors).
    """

    c: Mapping[int, float] = field(default_factory=dict)
    t_embed_head: float = 0.0
    source: str = ""

    def segment_ms(self, k: int) -> float:
        if k not in self.c:
            raise ValueError(f"no time for a {k}-layer segment (have k = {sorted(self.c)}); measure c_{k}")
        return float(self.c[k])

    def to_dict(self) -> dict:
        return {"c_ms": {str(k): float(v) for k, v in sorted(self.c.items())},
                "t_embed_head_ms": float(self.t_embed_head), "source": self.source}


def segments_of(num_layers: int, groups: Sequence[Sequence[int]]) -> list[int]:
    """Sizes of the sequential steps in layer order: 1 per ungrouped layer, P per group.

    Example:
        >>> segments_of(6, [[2, 3]])
        [1, 1, 2, 1, 1]
    """
    starts = {g[0]: len(g) for g in groups}
    sizes, i = [], 0
    while i < num_layers:
        k = starts.get(i, 1)
        sizes.append(k)
        i += k
    return sizes


def modeled_step(num_layers: int, groups: Sequence[Sequence[int]], world_size: int, costs: SegmentCosts,
                 t_ar_ms: float, *, overlap: bool = False, half_costs: SegmentCosts | None = None,
                 t_ar_half_ms: float | None = None) -> dict:
    """Modeled ms of one step of a plan on ``world_size`` ranks.

    Args:
        num_layers: decoder layers L.
        groups: the plan's groups (lists of layer indices); W must divide each size > 1.
        world_size: W (1: the same engine on one device).
        costs: one-device segment times at the full batch.
        t_ar_ms: all-reduce time of one group's output at the full batch.
        overlap: model two micro-batches (needs ``half_costs`` and ``t_ar_half_ms``).
        half_costs, t_ar_half_ms: the same at half the batch (tokens).

    Returns:
        ``{"ms", "world_size", "overlap", "U", "split_groups", "terms"}``; ``terms`` holds the
        pieces of the sum (no overlap) or the schedule's stream busy times (overlap).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    sizes = segments_of(num_layers, groups)
    for k in sizes:
        if k > 1 and k % world_size:
            raise ValueError(f"a group of {k} layers cannot be split over {world_size} ranks")
    split = [k > 1 and world_size > 1 for k in sizes]
    local = [k // world_size if s else k for k, s in zip(sizes, split)]
    u = sum(1 for k in sizes if k == 1)
    n_split = sum(split)
    if not overlap:
        layers = sum(costs.segment_ms(k) for k, size in zip(local, sizes) if size == 1)
        grouped = sum(costs.segment_ms(k) for k, size in zip(local, sizes) if size > 1)
        comm = n_split * t_ar_ms
        return {
            "ms": costs.t_embed_head + layers + grouped + comm,
            "world_size": world_size, "overlap": False, "U": u, "split_groups": n_split,
            "terms": {"t_embed_head": costs.t_embed_head, "U*c_1": layers, "groups_compute": grouped,
                      "groups_all_reduce": comm},
        }
    if half_costs is None or t_ar_half_ms is None:
        raise ValueError("overlap=True needs half_costs and t_ar_half_ms (half-batch segment and all-reduce times)")
    ready = [0.0, 0.0]  # when micro-batch A / B has its input for the next segment
    compute_free = comm_free = compute_busy = comm_busy = 0.0
    for k, s in zip(local, split):
        c = half_costs.segment_ms(k)
        for mb in (0, 1):
            start = max(compute_free, ready[mb])
            compute_free = start + c
            compute_busy += c
            if s:
                comm_start = max(comm_free, compute_free)
                comm_free = comm_start + t_ar_half_ms
                comm_busy += t_ar_half_ms
                ready[mb] = comm_free
            else:
                ready[mb] = compute_free
    end = max(ready)
    return {
        "ms": costs.t_embed_head + end,
        "world_size": world_size, "overlap": True, "U": u, "split_groups": n_split,
        "terms": {"t_embed_head": costs.t_embed_head, "compute_stream_busy": compute_busy,
                  "comm_stream_busy": comm_busy, "schedule_end": end},
    }
