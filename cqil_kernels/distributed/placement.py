"""Which decoder layers each rank holds when CQIL groups are split over W processes.

A group of P layers reads one input, so its layers can run on different ranks at once: on W ranks
(W divides P) rank r holds the contiguous block of P/W layers ``[r*P/W, (r+1)*P/W)`` of the group,
computes their deltas, and one all-reduce per group sums them. Contiguous blocks (not the
reference implementation's ``j mod W``) keep a rank's layers adjacent, so its share of the
group is itself a smaller group and a gather of per-rank blocks comes back in layer order.
Layers outside groups (and groups of one layer), embeddings, the final norm and the LM head are
replicated: every rank computes them, no communication, at the price of their memory on every
rank.

Everything here is pure (no torch.distributed): the same answer on every rank, testable anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..plan import CQILPlan

__all__ = ["Placement", "place"]


@dataclass(frozen=True)
class Placement:
    """The layers of a plan assigned to ``world_size`` ranks (build it with :func:`place`).

    Attributes:
        world_size: number of ranks W.
        num_layers: decoder layers of the model.
        groups: the plan's groups (all of them, in plan order; groups of one layer are replicated).
        bypass: the plan's bypass distance d, an int or one per group (a group with d >= 1 needs
            earlier layers' attention outputs held elsewhere: one all-gather in that group).
    """

    world_size: int
    num_layers: int
    groups: tuple[tuple[int, ...], ...]
    bypass: int | tuple[int, ...] = 0

    # ------------------------------------------------------------------ queries
    def is_split(self, group_index: int) -> bool:
        """True when group ``group_index`` is spread over several ranks (P > 1 and W > 1)."""
        return self.world_size > 1 and len(self.groups[group_index]) > 1

    def shard(self, group_index: int, rank: int) -> tuple[int, ...]:
        """Layer indices of group ``group_index`` that ``rank`` holds (all of them when not split).

        Example:
            >>> place(CQILPlan([[4, 5, 6, 7]]), world_size=2, num_layers=8).shard(0, 1)
            (6, 7)
        """
        self._check_rank(rank)
        group = self.groups[group_index]
        if not self.is_split(group_index):
            return group
        per_rank = len(group) // self.world_size
        return group[rank * per_rank:(rank + 1) * per_rank]

    def local_positions(self, group_index: int, rank: int) -> range:
        """Positions j (0..P-1) inside the group of the layers ``rank`` holds."""
        group = self.groups[group_index]
        shard = self.shard(group_index, rank)
        start = group.index(shard[0])
        return range(start, start + len(shard))

    def owner(self, layer: int) -> int | None:
        """The one rank holding ``layer``, or None when every rank holds it (replicated)."""
        for gi, group in enumerate(self.groups):
            if layer in group:
                if not self.is_split(gi):
                    return None
                return (layer - group[0]) // (len(group) // self.world_size)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range: the model has {self.num_layers} layers")
        return None

    def layers_of(self, rank: int) -> tuple[int, ...]:
        """Every decoder layer ``rank`` holds (replicated ones and its shards), ascending."""
        self._check_rank(rank)
        return tuple(i for i in range(self.num_layers) if self.owner(i) in (None, rank))

    @property
    def replicated_layers(self) -> tuple[int, ...]:
        """Layers every rank holds and computes (outside groups, or in groups of one)."""
        return tuple(i for i in range(self.num_layers) if self.owner(i) is None)

    @property
    def num_split_groups(self) -> int:
        """Groups that end with one all-reduce (split over the ranks)."""
        return sum(self.is_split(gi) for gi in range(len(self.groups)))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """Plain data for reports: ``{"world_size", "num_layers", "groups", "bypass", "replicated",
        "ranks": [{"rank", "layers", "group_layers"}]}`` (``group_layers``: its shards only)."""
        ranks = []
        for r in range(self.world_size):
            shards = [list(self.shard(gi, r)) for gi in range(len(self.groups)) if self.is_split(gi)]
            ranks.append({"rank": r, "layers": list(self.layers_of(r)), "group_layers": shards})
        return {
            "world_size": self.world_size,
            "num_layers": self.num_layers,
            "groups": [list(g) for g in self.groups],
            "bypass": self.bypass if isinstance(self.bypass, int) else list(self.bypass),
            "replicated": list(self.replicated_layers),
            "ranks": ranks,
        }

    def to_json(self, **dumps_kwargs) -> str:
        return json.dumps(self.to_dict(), **dumps_kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> "Placement":
        """Rebuild (and re-check) a placement from :meth:`to_dict` output."""
        if not isinstance(data, dict) or not {"world_size", "num_layers", "groups"} <= set(data):
            raise ValueError("a placement dict needs the keys 'world_size', 'num_layers' and 'groups'")
        plan = CQILPlan(groups=data["groups"], bypass=data.get("bypass", 0))
        return place(plan, data["world_size"], data["num_layers"])

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an int in 0..{self.world_size - 1}, got {rank!r}")


def place(plan, world_size: int, num_layers: int) -> Placement:
    """Assign the layers of ``plan`` to ``world_size`` ranks.

    In each group of P > 1 layers rank r holds the P/W layers ``[r*P/W, (r+1)*P/W)``; every
    other layer is replicated. The same inputs give the same placement on every rank.

    Args:
        plan: a ``CQILPlan`` (or a list of groups, bypass 0).
        world_size: W >= 1; it must divide the size of every group of more than one layer.
        num_layers: decoder layers of the model (the plan must fit).

    Raises:
        ValueError: W < 1, the plan names a layer the model lacks, or W does not divide the size
            of some group (the message names the group).

    Example:
        >>> p = place(CQILPlan.contiguous(12, 30, 2), world_size=2, num_layers=32)
        >>> p.shard(0, 0), p.shard(0, 1), p.owner(3)
        ((12,), (13,), None)
    """
    if not isinstance(plan, CQILPlan):
        plan = CQILPlan(groups=plan)
    for name, value in (("world_size", world_size), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    plan.validate_for(num_layers)
    for gi, group in enumerate(plan.groups):
        size = len(group)
        if size > 1 and size % world_size != 0:
            raise ValueError(
                f"group {gi} {list(group)} of {size} layers cannot be split over {world_size} ranks: the "
                f"world size must divide the size of every group (here a divisor of {size}); start "
                f"{_divisors(size)} processes or use a plan whose groups are multiples of {world_size}"
            )
    return Placement(world_size=world_size, num_layers=num_layers, groups=plan.groups, bypass=plan.bypass)


def _divisors(n: int) -> str:
    return " or ".join(str(d) for d in range(1, n + 1) if n % d == 0)
