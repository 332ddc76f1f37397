"""Ranks started with different plans, models or weights are refused at start, by name.

Every rank computes a :func:`fingerprint` - the plan, a hash of the model config, a cheap hash
of the weights, the software versions and the world size - and :func:`check_consistent`
gathers them (``all_gather_object``) and compares. All ranks see the same gathered list, so they
all raise together: nobody is left waiting in a collective the others never reach.

The weight hash reads a fixed, evenly spaced sample of each tensor's elements (their bits, not
their values rounded), so a different checkpoint, seed or dtype shows; a change confined to a
few unsampled elements does not (the price of not reading every weight). Compute it on
parameters every rank holds: before freeing the other ranks' layers, or on the replicated ones.
"""

from __future__ import annotations

import hashlib
import json

import torch

__all__ = ["RankMismatchError", "fingerprint", "weight_fingerprint", "config_fingerprint", "compare", "check_consistent",
           "shared_seed", "check_same"]

# Config entries that differ between two loads of the same model (path, hub revision, writer).
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "_commit_hash", "transformers_version")


class RankMismatchError(ValueError):
    """The ranks of one run were started with different plans, models, weights or software."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def config_fingerprint(config) -> str:
    """Hash of a model config (a transformers ``PretrainedConfig`` or a dict), volatile keys dropped."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data = {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS}
    return _digest(json.dumps(data, sort_keys=True, default=str).encode())


def weight_fingerprint(named_tensors, samples: int = 64) -> str:
    """Hash of names, shapes, dtypes and ``samples`` evenly spaced elements of each tensor.

    Args:
        named_tensors: iterable of ``(name, tensor)``, e.g. ``model.named_parameters()``; every
            rank must pass the same names in the same order.
        samples: elements read per tensor (all of a smaller one).

    One device-to-host copy in all, whatever the number of tensors.
    """
    header, pieces = [], []
    for name, t in named_tensors:
        flat = t.detach().reshape(-1)
        n = flat.numel()
        header.append(f"{name}:{list(t.shape)}:{t.dtype}")
        if n == 0:
            continue
        idx = torch.linspace(0, n - 1, min(n, samples), device=flat.device).round().long()
        pieces.append(flat[idx].contiguous().view(torch.uint8))  # the bits, whatever the dtype
    h = hashlib.sha256("\n".join(header).encode())
    if pieces:
        h.update(torch.cat([p.to("cpu") for p in pieces]).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(plan=None, config=None, named_tensors=None, world_size: int | None = None,
                extra: dict | None = None) -> dict:
    """What must be equal on every rank of a run, as plain strings.

    Args:
        plan: a ``CQILPlan`` (recorded as its JSON, so a mismatch shows the plans themselves).
        config: the model config.
        named_tensors: ``(name, tensor)`` pairs for :func:`weight_fingerprint`.
        world_size: the world size this rank believes in.
        extra: further ``name -> str`` entries to compare (e.g. the placement, the engine options).

    Returns:
        ``{"plan", "model_config", "weights", "world_size", "software", ...}`` (only what was given,
        plus "software": torch / transformers / cqil_kernels versions).
    """
    fp: dict[str, str] = {}
    if plan is not None:
        fp["plan"] = plan.to_json() if hasattr(plan, "to_json") else json.dumps(plan, sort_keys=True)
    if config is not None:
        fp["model_config"] = config_fingerprint(config)
    if named_tensors is not None:
        fp["weights"] = weight_fingerprint(named_tensors)
    if world_size is not None:
        fp["world_size"] = str(world_size)
    fp["software"] = _software()
    for key, value in (extra or {}).items():
        fp[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return fp


def _software() -> str:
    from importlib import metadata

    from .. import __version__ as cqil_version

    try:  # the installed version, without importing transformers (seconds on a busy machine)
        tf = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        tf = None
    return f"torch {torch.__version__}, transformers {tf}, cqil_kernels {cqil_version}"


def _shorten(value: str, limit: int = 120) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def compare(fingerprints: list[dict]) -> list[str]:
    """Human-readable differences between per-rank fingerprints (rank i = list index); [] if equal."""
    problems = []
    keys = sorted({k for fp in fingerprints for k in fp}, key=lambda k: (k != "plan", k))
    for key in keys:
        values = [fp.get(key) for fp in fingerprints]
        if len(set(values)) == 1:
            continue
        by_value: dict[str | None, list[int]] = {}
        for rank, v in enumerate(values):
            by_value.setdefault(v, []).append(rank)
        parts = [f"rank{'s' if len(r) > 1 else ''} {','.join(map(str, r))}: "
                 f"{'(missing)' if v is None else _shorten(v)}" for v, r in by_value.items()]
        problems.append(f"{key} differs ({'; '.join(parts)})")
    return problems


def check_consistent(fp: dict, group, rank: int | None = None, timeout_s: float | None = None) -> None:
    """Compare this rank's fingerprint with every other rank's; raise on any difference.

    A collective over ``group`` (every rank calls it once, at start, before the first forward).
    ``group=None`` (one process): nothing to compare.

    Raises:
        RankMismatchError: naming each entry that differs and which ranks hold which value (raised
            on every rank).
        DistributedError: a peer never arrived (timeout) or died.
    """
    if group is None:
        return
    import torch.distributed as dist

    from .faults import collective_guard

    gathered: list = [None] * dist.get_world_size(group)
    with collective_guard("consistency check (all_gather_object)", rank, timeout_s):
        dist.all_gather_object(gathered, fp, group=group)
    problems = compare(gathered)
    if problems:
        raise RankMismatchError(
            "the ranks of this run were started differently - " + " | ".join(problems)
            + ". Start every rank with the same --model, --plan and options."
        )


def shared_seed(group, seed: int | None = None, rank: int | None = None, timeout_s: float | None = None) -> int:
    """Seed torch's generators with the same value on every rank: rank 0's ``seed`` (a fresh one
    when None), broadcast. Sampling through transformers' ``generate`` then draws the same tokens
    on every rank, since their logits are bitwise equal; :func:`check_same` verifies it.

    A collective over ``group`` (None: one process, seeds with ``seed`` if given). Returns the seed.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if group is None:
        if seed is not None:
            torch.manual_seed(seed)
        return seed if seed is not None else torch.initial_seed()
    import torch.distributed as dist

    from .faults import collective_guard

    value = [seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item())]
    with collective_guard("seed broadcast", rank, timeout_s):
        dist.broadcast_object_list(value, src=dist.get_global_rank(group, 0), group=group)
    torch.manual_seed(value[0])
    return value[0]


def check_same(t: torch.Tensor, group, what: str, rank: int | None = None, timeout_s: float | None = None) -> None:
    """Raise :class:`RankMismatchError` on every rank unless ``t`` (e.g. generated token ids) is
    bitwise equal on all of them. A collective over ``group`` (None: nothing to compare)."""
    if group is None:
        return
    import torch.distributed as dist

    from .faults import collective_guard

    digest = _digest(t.detach().to("cpu").contiguous().numpy().tobytes() + str(tuple(t.shape)).encode())
    gathered: list = [None] * dist.get_world_size(group)
    with collective_guard(f"comparing {what} across ranks", rank, timeout_s):
        dist.all_gather_object(gathered, digest, group=group)
    if len(set(gathered)) > 1:
        ranks = {d: [r for r, g in enumerate(gathered) if g == d] for d in gathered}
        raise RankMismatchError(f"{what} differ across ranks (ranks with equal values: {sorted(ranks.values())})")
