"""CQIL plans: which adjacent decoder layers share one input.

A plan is a list of groups of consecutive layer indices plus the bypass distance ``d``.
Layers outside every group run sequentially, exactly as in the original model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Sequence

__all__ = ["CQILPlan"]


def _as_int(value, what: str) -> int:
    # bool is an int subclass; a plan written as [true, false] is a bug, not layer 1 and 0.
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np  # numpy ints come back from searches and argsorts

            if isinstance(value, np.integer):
                return int(value)
        except ImportError:  # pragma: no cover - numpy ships with torch
            pass
        raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    return value


@dataclass(frozen=True)
class CQILPlan:
    """Groups of adjacent layers computed from one shared input.

    Args:
        groups: lists of consecutive layer indices, e.g. ``[[12, 13], [14, 15]]``. Groups are
            disjoint and sorted. A group of one layer is legal and runs sequentially.
        bypass: the distance ``d``: layer ``j`` of a group also feeds the attention outputs of the
            ``min(d, j)`` layers before it in its group into its MLP input. ``0 <= d <= P-1`` for
            every group of size ``P``.

    Example:
        >>> CQILPlan(groups=[[12, 13], [14, 15]], bypass=1).num_sequential_steps(30)
        28
    """

    groups: tuple[tuple[int, ...], ...] = field(default_factory=tuple)
    bypass: int = 0

    def __init__(self, groups: Iterable[Sequence[int]] = (), bypass: int = 0):
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
            raise TypeError(f"groups must be a list of lists of layer indices, got {groups!r}")
        norm: list[tuple[int, ...]] = []
        for gi, group in enumerate(groups):
            if isinstance(group, (str, bytes)) or not isinstance(group, Iterable):
                raise TypeError(f"group {gi} must be a list of layer indices, got {group!r}")
            norm.append(tuple(_as_int(v, f"layer index in group {gi}") for v in group))
        bypass = _as_int(bypass, "bypass")
        object.__setattr__(self, "groups", tuple(norm))
        object.__setattr__(self, "bypass", bypass)
        self._check_structure()

    # ----------------------------------------------------------------- validation
    def _check_structure(self) -> None:
        """Checks that need no model: shape of every group and the bypass range."""
        if self.bypass < 0:
            raise ValueError(f"bypass must be >= 0, got {self.bypass}")
        previous_end = None
        for gi, group in enumerate(self.groups):
            if len(group) == 0:
                raise ValueError(f"group {gi} is empty")
            if any(v < 0 for v in group):
                raise ValueError(f"group {gi} {list(group)} has a negative layer index")
            for a, b in zip(group, group[1:]):
                if b <= a:
                    raise ValueError(f"group {gi} {list(group)} is not sorted ascending without repeats")
                if b != a + 1:
                    raise ValueError(
                        f"group {gi} {list(group)} has a gap between layers {a} and {b}: "
                        "a group must be consecutive layers"
                    )
            if previous_end is not None and group[0] <= previous_end:
                raise ValueError(
                    f"group {gi} {list(group)} overlaps or comes before the previous group "
                    f"(ending at layer {previous_end}): groups must be disjoint and in order"
                )
            previous_end = group[-1]
            if self.bypass > len(group) - 1 and len(group) > 1:
                raise ValueError(
                    f"bypass {self.bypass} is out of range for group {gi} {list(group)} of size "
                    f"{len(group)}: need 0 <= bypass <= {len(group) - 1}"
                )
        if self.bypass > 0 and self.groups and all(len(g) == 1 for g in self.groups):
            raise ValueError(f"bypass {self.bypass} needs a group of at least {self.bypass + 1} layers")

    def validate_for(self, num_layers: int) -> None:
        """Raise ValueError if the plan names a layer the model does not have."""
        for gi, group in enumerate(self.groups):
            if group[-1] >= num_layers:
                raise ValueError(
                    f"group {gi} {list(group)} is out of range: the model has {num_layers} layers "
                    f"(indices 0..{num_layers - 1})"
                )

    # ----------------------------------------------------------------- constructors
    @classmethod
    def contiguous(cls, start: int, end: int, parallel: int, bypass: int = 0) -> "CQILPlan":
        """The reference implementation's S/E/P plan: runs of ``parallel`` layers in [start, end).

        A short tail run (fewer than ``parallel`` layers left before ``end``) stays sequential,
        as in the reference code. ``CQILPlan.contiguous(12, 30, 2)`` gives 9 pairs 12-13 .. 28-29.
        """
        start, end, parallel = (_as_int(v, n) for v, n in ((start, "start"), (end, "end"), (parallel, "parallel")))
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        if start < 0 or end < start:
            raise ValueError(f"need 0 <= start <= end, got start={start} end={end}")
        groups = [list(range(s, s + parallel)) for s in range(start, end - parallel + 1, parallel)]
        if parallel == 1:
            groups = []
        return cls(groups=groups, bypass=bypass)

    @classmethod
    def sequential(cls) -> "CQILPlan":
        """The empty plan: every layer runs as in the original model."""
        return cls(groups=[], bypass=0)

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return {"groups": [list(g) for g in self.groups], "bypass": self.bypass}

    @classmethod
    def from_dict(cls, data: dict) -> "CQILPlan":
        if not isinstance(data, dict):
            raise TypeError(f"a plan must be a dict with keys 'groups' and 'bypass', got {type(data).__name__}")
        unknown = set(data) - {"groups", "bypass"}
        if unknown:
            raise ValueError(f"unknown plan keys {sorted(unknown)}; expected 'groups' and 'bypass'")
        if "groups" not in data:
            raise ValueError("plan has no 'groups' key")
        return cls(groups=data["groups"], bypass=data.get("bypass", 0))

    def to_json(self, path=None, **dumps_kwargs) -> str:
        """The plan as JSON ``{"groups": [[...], ...], "bypass": d}``; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), **dumps_kwargs)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path) -> "CQILPlan":
        """Parse a plan from a JSON string, or from a file when given a path to one."""
        import os

        text = text_or_path
        if isinstance(text_or_path, os.PathLike) or (
            isinstance(text_or_path, str) and not text_or_path.lstrip().startswith("{")
        ):
            path = os.fspath(text_or_path)
            if not os.path.exists(path):
                raise FileNotFoundError(f"plan file not found: {path}")
            with open(path, encoding="utf-8") as f:
                text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(data)

    # ----------------------------------------------------------------- queries
    @property
    def parallel_groups(self) -> tuple[tuple[int, ...], ...]:
        """Groups of 2 or more layers (size-1 groups are sequential layers)."""
        return tuple(g for g in self.groups if len(g) > 1)

    def num_sequential_steps(self, num_layers: int) -> int:
        """Sequential steps of a forward: ``num_layers`` minus what grouping saves."""
        return num_layers - sum(len(g) - 1 for g in self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __repr__(self) -> str:
        return f"CQILPlan(groups={[list(g) for g in self.groups]}, bypass={self.bypass})"
