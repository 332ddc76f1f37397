"""CQIL plans: which adjacent decoder layers share one input.

A plan is a list of groups of consecutive layer indices plus the bypass distance ``d``: one ``d``
for every group, or one per group. Layers outside every group run sequentially, exactly as in
the original model.
"""

from __future__ import annotations

import json
import os
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


_BYPASS_RULE = (
    "a group of P >= 2 layers takes 0 <= d <= P-1; a one-layer group runs sequentially, so it "
    "takes only d = 0 (one int for the whole plan applies to its groups of 2 or more layers, and "
    "d > 0 needs at least one such group)"
)


@dataclass(frozen=True, init=False)
class CQILPlan:
    """Groups of adjacent layers computed from one shared input.

    Args:
        groups: lists of consecutive layer indices, e.g. ``[[12, 13], [14, 15]]``. Groups are
            disjoint and sorted. A group of one layer is legal and runs sequentially.
        bypass: the distance ``d``: layer ``j`` of a group also feeds the attention outputs of the
            ``min(d, j)`` layers before it in its group into its MLP input. Either one int for
            every group of 2 or more layers, or a list with one int per group (``bypass[i]`` for
            ``groups[i]``). The rule: a group of ``P >= 2`` layers needs ``0 <= d <= P-1``; a
            one-layer group runs sequentially and takes only ``d = 0`` (an int ``d`` skips it, a
            list must say 0 for it); ``d > 0`` needs at least one group of 2 or more layers.

    Attributes:
        groups: tuple of tuples of layer indices.
        bypasses: the effective ``d`` of every group, one int per group (0 for one-layer groups).
        bypass: the plan's ``d`` when every group of 2 or more layers has the same one (an int;
            0 for a plan without such groups); otherwise the tuple ``bypasses``. This is also the
            serialised form: JSON ``"bypass"`` is an int when all groups agree, else a list.

    Example:
        >>> CQILPlan(groups=[[12, 13], [14, 15]], bypass=1).num_sequential_steps(30)
        28
        >>> CQILPlan([[12, 13], [14, 15, 16]], bypass=[1, 2]).bypass_of(1)
        2
    """

    groups: tuple[tuple[int, ...], ...] = field(default_factory=tuple)
    bypasses: tuple[int, ...] = field(default_factory=tuple)

    def __init__(self, groups: Iterable[Sequence[int]] = (), bypass: int | Sequence[int] = 0):
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
            raise TypeError(f"groups must be a list of lists of layer indices, got {groups!r}")
        norm: list[tuple[int, ...]] = []
        for gi, group in enumerate(groups):
            if isinstance(group, (str, bytes)) or not isinstance(group, Iterable):
                raise TypeError(f"group {gi} must be a list of layer indices, got {group!r}")
            norm.append(tuple(_as_int(v, f"layer index in group {gi}") for v in group))
        object.__setattr__(self, "groups", tuple(norm))
        self._check_structure()
        object.__setattr__(self, "bypasses", self._resolve_bypass(bypass))

    # ----------------------------------------------------------------- validation
    def _check_structure(self) -> None:
        """Checks that need no model: shape of every group."""
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

    def _resolve_bypass(self, bypass) -> tuple[int, ...]:
        """One int or one int per group -> the effective d of every group (validated)."""
        if isinstance(bypass, (str, bytes)):
            raise TypeError(f"bypass must be an int or a list of ints (one per group), got {bypass!r}")
        if isinstance(bypass, Iterable):
            values = [_as_int(v, f"bypass[{i}]") for i, v in enumerate(bypass)]
            if len(values) != len(self.groups):
                raise ValueError(
                    f"bypass has {len(values)} values for {len(self.groups)} groups: give one int for "
                    "every group, or one per group"
                )
            for gi, (group, d) in enumerate(zip(self.groups, values)):
                if not 0 <= d <= len(group) - 1:
                    raise ValueError(
                        f"bypass[{gi}] = {d} is out of range for group {gi} {list(group)} of size "
                        f"{len(group)}: need 0 <= d <= {len(group) - 1} ({_BYPASS_RULE})"
                    )
            return tuple(values)
        d = _as_int(bypass, "bypass")
        if d < 0:
            raise ValueError(f"bypass must be >= 0, got {d}")
        multi = [(gi, g) for gi, g in enumerate(self.groups) if len(g) > 1]
        if d > 0 and not multi:
            raise ValueError(
                f"bypass {d} needs a group of at least {d + 1} layers; this plan has no group of 2 or "
                f"more layers ({_BYPASS_RULE})"
            )
        for gi, group in multi:
            if d > len(group) - 1:
                raise ValueError(
                    f"bypass {d} is out of range for group {gi} {list(group)} of size {len(group)}: "
                    f"need 0 <= bypass <= {len(group) - 1} ({_BYPASS_RULE})"
                )
        return tuple(d if len(g) > 1 else 0 for g in self.groups)

    def validate_for(self, num_layers: int) -> None:
        """Raise ValueError if the plan names a layer the model does not have."""
        for gi, group in enumerate(self.groups):
            if group[-1] >= num_layers:
                raise ValueError(
                    f"group {gi} {list(group)} is out of range: the model has {num_layers} layers "
                    f"(indices 0..{num_layers - 1})"
                )

    # ----------------------------------------------------------------- bypass
    @property
    def bypass(self) -> int | tuple[int, ...]:
        """The plan's one ``d`` (int) when all groups of 2+ layers agree, else ``bypasses``."""
        values = {d for g, d in zip(self.groups, self.bypasses) if len(g) > 1}
        if len(values) <= 1:
            return values.pop() if values else 0
        return self.bypasses

    @property
    def uniform_bypass(self) -> bool:
        """Whether one int describes the bypass of every group (``bypass`` is then an int)."""
        return isinstance(self.bypass, int)

    def bypass_of(self, index: int) -> int:
        """The bypass distance of ``groups[index]``."""
        return self.bypasses[index]

    def with_bypass(self, bypass: int | Sequence[int]) -> "CQILPlan":
        """The same groups with another bypass (an int or one per group)."""
        return CQILPlan(self.groups, bypass=bypass)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def contiguous(cls, start: int, end: int, parallel: int, bypass: int = 0) -> "CQILPlan":
        """The paper's S/E/P plan: runs of ``parallel`` layers from ``start`` up to ``end``.

        ``CQILPlan.contiguous(12, 30, 2)`` gives 9 pairs 12-13 .. 28-29. When ``end - start`` is
        not a multiple of ``parallel``, the short tail (fewer than ``parallel`` layers before
        ``end``) stays sequential here: ``contiguous(12, 30, 4)`` ends with 24..27 and leaves 28,
        29 sequential. This differs from the reference code (github Photooon/CQIL,
        ``cqil_model.py``), which deals the layers ``start..end-1`` round-robin to ``parallel``
        ranks: there the ranks then hold unequal numbers of layers and the last, unpaired layer's
        all-reduce has no partner, so such an S/E/P does not run. ``parallel=1`` gives no group
        (every layer sequential), so it takes only ``bypass=0``.
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
        """``{"groups": [[...], ...], "bypass": d}``; ``d`` is a list (one per group) when groups differ."""
        bypass = self.bypass
        return {"groups": [list(g) for g in self.groups], "bypass": bypass if isinstance(bypass, int) else list(bypass)}

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
        """Parse a plan from JSON text or from a file.

        A ``Path`` (any ``os.PathLike``) is always a file. A string is a file when a file of that
        name exists; otherwise it is JSON text when it starts with ``{`` or ``[`` (after
        whitespace), and else a file name that does not exist (FileNotFoundError). The JSON must
        be an object ``{"groups": [[...], ...], "bypass": d}``.
        """
        if isinstance(text_or_path, os.PathLike):
            text, source = cls._read_file(os.fspath(text_or_path)), os.fspath(text_or_path)
        elif isinstance(text_or_path, str):
            stripped = text_or_path.lstrip()
            looks_like_json = stripped[:1] in ("{", "[")
            if not looks_like_json or ("\n" not in text_or_path and os.path.isfile(text_or_path)):
                text, source = cls._read_file(text_or_path), text_or_path
            else:
                text, source = text_or_path, "plan JSON text"
        else:
            raise TypeError(f"from_json takes JSON text or a path, got {type(text_or_path).__name__}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan is not valid JSON ({source}): {e}") from None
        if not isinstance(data, dict):
            hint = f' (did you mean {{"groups": {json.dumps(data)}}}?)' if isinstance(data, list) else ""
            raise ValueError(
                f'a plan in JSON must be an object {{"groups": [[...], ...], "bypass": d}}, got a '
                f"{type(data).__name__} ({source}){hint}"
            )
        return cls.from_dict(data)

    @staticmethod
    def _read_file(path: str) -> str:
        if os.path.isdir(path):
            raise ValueError(f"plan path is a directory, not a JSON file: {path}")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"plan file not found: {path} (JSON text must start with '{{': "
                '{"groups": [[...], ...], "bypass": d})'
            )
        with open(path, encoding="utf-8") as f:
            return f.read()

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
        bypass = self.bypass
        return f"CQILPlan(groups={[list(g) for g in self.groups]}, bypass={bypass if isinstance(bypass, int) else list(bypass)})"
