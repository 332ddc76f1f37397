"""Launch configuration of the fused kernels: one frozen object instead of module globals.

Every launch decision the Triton ops make that is not fixed by the math lives in a
:class:`LaunchConfig`: the tile table (per op and shape class, optionally per exact shape), the
split-K policy and how split partials are finished, the prefill threshold of the Triton op set
(rows above which GEMMs go to cuBLAS), the decode attention's block and split choices, and an SM
count override. Ops read the config **when they launch** (never at import), so:

- ``with use_launch_config(cfg):`` or ``with use_launch_config(splitk_mode="kernel"):`` changes the
  decisions for the launches inside the block (a ``contextvars`` variable: per thread and task);
- ``DecodeEngine(model, launch_config=cfg)`` runs its steps under ``cfg``, and keys its CUDA
  graphs on (batch size, effective config): a graph captured under one config is never replayed
  under another;
- without either, a launch on a CUDA device uses that device's **tuned file** when one ships in the
  package data folder ``cqil_kernels/launch_configs/<device name>.json`` (written by
  ``python -m cqil_kernels tune --kernels``), else the built-in heuristics; a launch on the CPU
  (the Triton interpreter) uses the interpreter's heuristics (few large tiles: the interpreter's
  cost is per operation).

Where a tuned file is found and how: only the package data folder is searched, by the CUDA device
name (spaces as underscores, as vLLM's per-device files); no environment variable is read. Any
other file is passed explicitly: ``load_launch_config(path)``, ``use_launch_config(path)``,
``DecodeEngine(..., launch_config=path)`` or ``--launch-config PATH`` on the command line. A file
given explicitly that is malformed or was tuned on another device raises
:class:`LaunchConfigError` (a ValueError naming the file and the field); a file found
automatically that is malformed or foreign gives a warning and the heuristics. Every value is
range-checked when the config is built, so a bad file can never reach a kernel.

Example:
    >>> from cqil_kernels.launch_config import heuristic_config, use_launch_config
    >>> cfg = heuristic_config("gpu", sm_count=132)            # the H100's decisions, anywhere
    >>> with use_launch_config(cfg.replace(splitk_mode="kernel")):
    ...     pass                                                # launches here use it

This module imports only the standard library and torch (lazily, for device queries).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "GEMM_OPS",
    "SHAPE_CLASSES",
    "SPLITK_MODES",
    "GemmTile",
    "TileRule",
    "AttentionTile",
    "LaunchConfig",
    "LaunchConfigError",
    "shape_class",
    "heuristic_config",
    "default_launch_config",
    "launch_config_for",
    "use_launch_config",
    "load_launch_config",
    "save_launch_config",
    "config_dir",
    "config_path_for",
    "device_file_name",
]

GEMM_OPS = ("qkv_gemm", "batched_gemm", "gate_up_silu", "down_sum")
# Shape classes by the GEMM's row count M: decode batches stream weights (skinny tiles, split-K),
# mid-sized ones move towards a compute tile, prefill is compute-bound.
SHAPE_CLASSES = ("decode", "mid", "prefill")
DECODE_MAX_M = 16
MID_MAX_M = 64
# "serial": each split program stores its fp32 partial tile and the last program to arrive at a
# tile (an atomic counter per tile) sums the partials in split order and runs the epilogue, so a
# split GEMM (and the split-KV attention) is one launch. "kernel": a second, separate reduction
# kernel does it. Both add the same partials in the same order.
SPLITK_MODES = ("serial", "kernel")
FORMAT = "cqil_kernels.launch_config"
FORMAT_VERSION = 1

_POW2_TILES = (16, 32, 64, 128, 256)
_WARPS = (1, 2, 4, 8, 16)


class LaunchConfigError(ValueError):
    """A launch configuration (or its file) that cannot be used; the message names the field."""


def shape_class(M: int) -> str:
    """"decode" (M <= 16), "mid" (M <= 64) or "prefill" (M > 64) for a GEMM of M rows."""
    if M <= DECODE_MAX_M:
        return "decode"
    return "mid" if M <= MID_MAX_M else "prefill"


def _check_int(value, where: str, lo: int, hi: int, allowed=None, optional: bool = False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise LaunchConfigError(f"{where} must be an integer, got {value!r}")
    if allowed is not None and value not in allowed:
        raise LaunchConfigError(f"{where} must be one of {list(allowed)}, got {value}")
    if not lo <= value <= hi:
        raise LaunchConfigError(f"{where} must be in {lo}..{hi}, got {value}")
    return value


@dataclass(frozen=True)
class GemmTile:
    """Tile and launch options of one GEMM kernel launch.

    BM x BN output tile, BK-wide K steps; ``split_k``: programs splitting the K loop (None: the
    config's split policy decides from the tile count and the SM count).
    """

    BM: int
    BN: int
    BK: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int | None = None

    def check(self, where: str = "tile") -> "GemmTile":
        for name in ("BM", "BN", "BK"):
            _check_int(getattr(self, name), f"{where}.{name}", 16, 256, _POW2_TILES)
        _check_int(self.num_warps, f"{where}.num_warps", 1, 16, _WARPS)
        _check_int(self.num_stages, f"{where}.num_stages", 1, 8)
        _check_int(self.split_k, f"{where}.split_k", 1, 64, optional=True)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TileRule:
    """One row of the tile table: ``op`` ("*" = any GEMM op) in ``shape_class`` uses ``tile``.

    ``shape``: ``(N, K, P)`` - per-layer output width, reduction length, layers in the launch -
    when the row was tuned for one exact shape (it then wins over the class row).
    """

    op: str
    shape_class: str
    tile: GemmTile
    shape: tuple[int, int, int] | None = None

    def check(self, where: str = "rule") -> "TileRule":
        if self.op != "*" and self.op not in GEMM_OPS:
            raise LaunchConfigError(f"{where}.op must be '*' or one of {list(GEMM_OPS)}, got {self.op!r}")
        if self.shape_class not in SHAPE_CLASSES:
            raise LaunchConfigError(f"{where}.shape_class must be one of {list(SHAPE_CLASSES)}, got {self.shape_class!r}")
        if self.shape is not None:
            if self.op == "*":
                raise LaunchConfigError(f"{where}: an exact-shape row needs a named op, not '*'")
            if not isinstance(self.shape, tuple) or len(self.shape) != 3:
                raise LaunchConfigError(f"{where}.shape must be [N, K, P], got {self.shape!r}")
            for name, v in zip("NKP", self.shape):
                _check_int(v, f"{where}.shape.{name}", 1, 1 << 24)
        if not isinstance(self.tile, GemmTile):
            raise LaunchConfigError(f"{where}.tile must be a GemmTile, got {type(self.tile).__name__}")
        self.tile.check(f"{where}.tile")
        return self

    @property
    def key(self) -> tuple:
        return (self.op, self.shape_class, self.shape)

    def to_dict(self) -> dict:
        d = {"op": self.op, "shape_class": self.shape_class, "shape": list(self.shape) if self.shape else None}
        d.update(self.tile.to_dict())
        return d


@dataclass(frozen=True)
class AttentionTile:
    """Split-KV decode attention: KV positions per block, launch options, and the KV split
    count (None: about ``programs_per_sm`` programs per SM, at most ``max_kv_splits``)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None

    def check(self, where: str = "attention") -> "AttentionTile":
        _check_int(self.block_n, f"{where}.block_n", 16, 256, _POW2_TILES)
        _check_int(self.num_warps, f"{where}.num_warps", 1, 16, _WARPS)
        _check_int(self.num_stages, f"{where}.num_stages", 1, 8)
        _check_int(self.num_splits, f"{where}.num_splits", 1, 256, optional=True)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LaunchConfig:
    """Every launch decision of the fused kernels (frozen, hashable: a CUDA-graph cache key).

    Attributes:
        tiles: the tile table, looked up by :meth:`gemm_tile` (exact shape, then op and shape
            class, then "*" and shape class).
        attention: the split-KV decode attention's choices.
        splitk_mode: "serial" (the last split program finishes the tile: one launch) or "kernel"
            (a separate reduction launch).
        programs_per_sm: split policy target, about this many programs per SM.
        max_split_k: at most this many K splits (policy; an explicit ``split_k`` may go to 64).
        max_kv_splits: at most this many KV splits of the decode attention (policy).
        prefill_m: GEMMs of more rows than this go to cuBLAS (the Triton op set, on a GPU only);
            None: the kernels at every size.
        sm_count: SMs to size grids for (None: ask the device; 1 under the interpreter).
        reduce_block: (rows, columns) tile of the separate split-K reduction kernel.
        poison_workspaces: fill split-K / split-KV workspaces with NaN (tests: a program that
            skips its slice cannot pass).
        source: where the config came from (not part of equality).
    """

    tiles: tuple[TileRule, ...]
    attention: AttentionTile = AttentionTile()
    splitk_mode: str = "serial"
    programs_per_sm: int = 2
    max_split_k: int = 32
    max_kv_splits: int = 64
    prefill_m: int | None = 64
    sm_count: int | None = None
    reduce_block: tuple[int, int] = (16, 128)
    poison_workspaces: bool = False
    source: str = field(default="heuristics", compare=False)

    def __post_init__(self):
        if not isinstance(self.tiles, tuple):
            raise LaunchConfigError(f"tiles must be a tuple of TileRule, got {type(self.tiles).__name__}")
        seen = set()
        for i, rule in enumerate(self.tiles):
            if not isinstance(rule, TileRule):
                raise LaunchConfigError(f"tiles[{i}] must be a TileRule, got {type(rule).__name__}")
            rule.check(f"tiles[{i}]")
            if rule.key in seen:
                raise LaunchConfigError(f"tiles[{i}]: a second row for {rule.key}")
            seen.add(rule.key)
        missing = [c for c in SHAPE_CLASSES if ("*", c, None) not in seen]
        if missing:
            raise LaunchConfigError(f"the tile table needs a '*' row for every shape class; missing {missing}")
        if not isinstance(self.attention, AttentionTile):
            raise LaunchConfigError(f"attention must be an AttentionTile, got {type(self.attention).__name__}")
        self.attention.check()
        if self.splitk_mode not in SPLITK_MODES:
            raise LaunchConfigError(f"splitk_mode must be one of {list(SPLITK_MODES)}, got {self.splitk_mode!r}")
        _check_int(self.programs_per_sm, "programs_per_sm", 1, 16)
        _check_int(self.max_split_k, "max_split_k", 1, 64)
        _check_int(self.max_kv_splits, "max_kv_splits", 1, 256)
        _check_int(self.prefill_m, "prefill_m", 0, 1 << 20, optional=True)
        _check_int(self.sm_count, "sm_count", 1, 4096, optional=True)
        if not isinstance(self.reduce_block, tuple) or len(self.reduce_block) != 2:
            raise LaunchConfigError(f"reduce_block must be (rows, columns), got {self.reduce_block!r}")
        _check_int(self.reduce_block[0], "reduce_block[0]", 1, 256, (1, 2, 4, 8) + _POW2_TILES)
        _check_int(self.reduce_block[1], "reduce_block[1]", 16, 256, _POW2_TILES)
        if not isinstance(self.poison_workspaces, bool):
            raise LaunchConfigError(f"poison_workspaces must be True or False, got {self.poison_workspaces!r}")

    # The decode engine hashes its config at every step (its graph-cache key): hash once. Caches
    # live in the instance dict, are no fields (equality ignores them) and are not pickled (string
    # hashes differ between processes).
    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = self.__dict__["_hash"] = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)
                                                    if f.compare))
        return h

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_hash", "_table")}

    # ------------------------------------------------------------------ lookups
    @functools.cached_property
    def _table(self) -> dict:
        return {rule.key: rule.tile for rule in self.tiles}

    def gemm_tile(self, op: str, M: int, N: int, K: int, P: int) -> GemmTile:
        """The tile of a GEMM op launch of M rows, per-layer width N, reduction K, P layers."""
        cls = shape_class(M)
        table = self._table
        tile = table.get((op, cls, (N, K, P)))
        if tile is None:
            tile = table.get((op, cls, None))
        if tile is None:
            tile = table[("*", cls, None)]
        return tile

    def gemm_to_torch(self, device, rows: int) -> bool:
        """True when a GEMM of ``rows`` rows on ``device`` runs the torch reference (cuBLAS) instead
        of the kernel: on a GPU above ``prefill_m`` rows (compute-bound there, cuBLAS is the
        stronger kernel; the prefill target is parity with the unconverted model). Never on the
        CPU (the interpreter runs the kernels at every size)."""
        return self.prefill_m is not None and rows > self.prefill_m and getattr(device, "type", device) == "cuda"

    def sm_count_for(self, device) -> int:
        """SMs of ``device`` for grid sizing: the override, the GPU's count, or 1 (interpreter)."""
        if self.sm_count is not None:
            return self.sm_count
        import torch

        device = torch.device(device)
        if device.type != "cuda":
            return 1
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _device_sm_count(index)

    # ------------------------------------------------------------------ derived configs
    def replace(self, **changes) -> "LaunchConfig":
        """A copy with fields changed (validated), e.g. ``cfg.replace(splitk_mode="kernel")``."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise LaunchConfigError(f"unknown launch config fields {sorted(unknown)}; "
                                    f"known: {[f.name for f in dataclasses.fields(self)]}")
        if "tiles" in changes and not isinstance(changes["tiles"], tuple):
            changes["tiles"] = tuple(changes["tiles"])
        if "source" not in changes and changes:
            changes["source"] = f"{self.source} + " + ", ".join(f"{k}={v!r}" for k, v in sorted(changes.items())
                                                                if k != "tiles")
        return dataclasses.replace(self, **changes)

    def with_rules(self, rules, source: str | None = None) -> "LaunchConfig":
        """A copy whose tile table has ``rules`` added (a rule with the same key replaces it)."""
        rules = tuple(rules)
        keys = {r.key for r in rules}
        kept = tuple(r for r in self.tiles if r.key not in keys)
        return dataclasses.replace(self, tiles=rules + kept, source=source or self.source)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """The decisions as JSON-able data (the ``"config"`` part of a launch-config file)."""
        return {
            "splitk_mode": self.splitk_mode,
            "programs_per_sm": self.programs_per_sm,
            "max_split_k": self.max_split_k,
            "max_kv_splits": self.max_kv_splits,
            "prefill_m": self.prefill_m,
            "sm_count": self.sm_count,
            "reduce_block": list(self.reduce_block),
            "attention": self.attention.to_dict(),
            "tiles": [r.to_dict() for r in self.tiles],
        }

    @classmethod
    def from_dict(cls, data: dict, base: "LaunchConfig | None" = None, where: str = "config",
                  source: str = "dict") -> "LaunchConfig":
        """Parse :meth:`to_dict` data. Fields it lacks keep ``base``'s values (default: the GPU
        heuristics) and its tile rows are added on top of ``base``'s table."""
        if not isinstance(data, dict):
            raise LaunchConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
        base = base if base is not None else heuristic_config("gpu")
        known = {"splitk_mode", "programs_per_sm", "max_split_k", "max_kv_splits", "prefill_m", "sm_count",
                 "reduce_block", "attention", "tiles", "poison_workspaces"}
        unknown = set(data) - known
        if unknown:
            raise LaunchConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        changes = {k: data[k] for k in known - {"attention", "tiles", "reduce_block"} if k in data}
        if "reduce_block" in data:
            rb = data["reduce_block"]
            if not isinstance(rb, list) or len(rb) != 2:
                raise LaunchConfigError(f"{where}.reduce_block must be [rows, columns], got {rb!r}")
            changes["reduce_block"] = tuple(rb)
        if "attention" in data:
            changes["attention"] = _attention_from(data["attention"], base.attention, f"{where}.attention")
        rules = [_rule_from(r, f"{where}.tiles[{i}]") for i, r in enumerate(_as_list(data.get("tiles", []),
                                                                                       f"{where}.tiles"))]
        keys = [r.key for r in rules]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise LaunchConfigError(f"{where}.tiles: two rows for op {dup[0]!r}, class {dup[1]!r}, shape {dup[2]}")
        try:
            cfg = base.replace(**changes).with_rules(rules, source=source)
        except LaunchConfigError as e:
            raise LaunchConfigError(f"{where}: {e}") from None
        return cfg

    def describe(self) -> str:
        """One line: where the config is from and its main decisions."""
        return (f"{self.source}: split-K {self.splitk_mode}, {self.programs_per_sm} programs/SM, prefill_m "
                f"{self.prefill_m}, sm_count {self.sm_count or 'device'}, {len(self.tiles)} tile rows")


def _as_list(value, where):
    if not isinstance(value, list):
        raise LaunchConfigError(f"{where} must be a list, got {type(value).__name__}")
    return value


def _rule_from(d, where) -> TileRule:
    if not isinstance(d, dict):
        raise LaunchConfigError(f"{where} must be an object, got {type(d).__name__}")
    need = {"op", "shape_class", "BM", "BN", "BK"}
    allowed = need | {"shape", "num_warps", "num_stages", "split_k"}
    if not need <= set(d):
        raise LaunchConfigError(f"{where} lacks {sorted(need - set(d))}")
    if set(d) - allowed:
        raise LaunchConfigError(f"{where}: unknown keys {sorted(set(d) - allowed)}")
    shape = d.get("shape")
    if shape is not None:
        if not isinstance(shape, list) or len(shape) != 3:
            raise LaunchConfigError(f"{where}.shape must be [N, K, P] or null, got {shape!r}")
        shape = tuple(shape)
    tile = GemmTile(BM=d["BM"], BN=d["BN"], BK=d["BK"], num_warps=d.get("num_warps", 4),
                    num_stages=d.get("num_stages", 3), split_k=d.get("split_k")).check(where)
    return TileRule(op=d["op"], shape_class=d["shape_class"], tile=tile, shape=shape).check(where)


def _attention_from(d, base: AttentionTile, where) -> AttentionTile:
    if not isinstance(d, dict):
        raise LaunchConfigError(f"{where} must be an object, got {type(d).__name__}")
    unknown = set(d) - {f.name for f in dataclasses.fields(AttentionTile)}
    if unknown:
        raise LaunchConfigError(f"{where}: unknown keys {sorted(unknown)}")
    return dataclasses.replace(base, **d).check(where)


# ---------------------------------------------------------------------------------------------- heuristics
def _class_rules(tiles: dict, op: str = "*") -> tuple[TileRule, ...]:
    return tuple(TileRule(op, cls, tile) for cls, tile in tiles.items())


@functools.lru_cache(maxsize=None)
def heuristic_config(kind: str = "gpu", sm_count: int | None = None) -> LaunchConfig:
    """The built-in decisions: ``"gpu"`` (compiled kernels) or ``"interpreter"`` (CPU).

    GPU: decode (M <= 16) streams weights, so wide K tiles and several stages keep enough bytes in
    flight; larger M moves towards a compute tile. gate_up_silu carries two accumulators and two
    weight tiles, so its N tile is halved, and its decode K tile too (ptxas at Llama-7B shapes,
    sm_90: BK = 128 needs 255 registers and spills with a bypass term; BK = 64 needs 128-142, no
    spills). Fixed heuristics, not autotuning (autotune would re-benchmark inside a CUDA-graph
    capture and is very slow under the interpreter); ``tune --kernels`` measures replacements.

    Interpreter: its cost is per tl operation, so few large-ish tiles are cheapest; no split by
    default (1 SM; tests force split-K explicitly).

    ``sm_count`` overrides the device's: ``heuristic_config("gpu", sm_count=132)`` takes the
    H100's decisions on any device (launch counting and PTX checks on the CPU).
    """
    if kind == "interpreter":
        tiles = _class_rules({c: GemmTile(16, 32, 32, 4, 1) for c in SHAPE_CLASSES})
        return LaunchConfig(tiles=tiles, attention=AttentionTile(block_n=32), reduce_block=(16, 64),
                            sm_count=sm_count, source="heuristics (interpreter)")
    if kind != "gpu":
        raise ValueError(f"kind must be 'gpu' or 'interpreter', got {kind!r}")
    tiles = _class_rules({"decode": GemmTile(16, 64, 128, 4, 4), "mid": GemmTile(64, 64, 64, 4, 4),
                          "prefill": GemmTile(128, 128, 64, 8, 3)})
    tiles += _class_rules({"decode": GemmTile(16, 64, 64, 4, 4), "mid": GemmTile(64, 64, 64, 4, 4),
                           "prefill": GemmTile(128, 64, 64, 8, 3)}, op="gate_up_silu")
    return LaunchConfig(tiles=tiles, sm_count=sm_count,
                        source="heuristics (gpu)" + (f", {sm_count} SMs" if sm_count else ""))


@functools.lru_cache(maxsize=None)
def _device_sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


# ---------------------------------------------------------------------------------------------- files
def config_dir() -> Path:
    """The package data folder searched for per-device files."""
    return Path(__file__).resolve().parent / "launch_configs"


def device_file_name(device_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3.json"``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in device_name.strip().replace(" ", "_"))
    return f"{safe}.json"


def config_path_for(device_name: str) -> Path:
    return config_dir() / device_file_name(device_name)


def _versions() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def save_launch_config(config: LaunchConfig, path, *, device_name: str, versions: dict | None = None,
                       tuning: dict | None = None) -> Path:
    """Write ``config`` as a per-device launch-config file (what ``tune --kernels`` produces).

    Args:
        config: the decisions (``config.to_dict()`` is stored under ``"config"``).
        path: the file; ``config_path_for(device_name)`` is where launches find it by themselves.
        device_name: the CUDA device name it was tuned on (checked when loading).
        versions: torch / triton / CUDA versions (default: this process's).
        tuning: free-form record of the measurements behind it (kept, not read back).
    """
    import datetime as _dt

    if not isinstance(device_name, str) or not device_name.strip():
        raise ValueError("device_name must name the device the config was tuned on")
    data = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "device": device_name,
        "versions": versions if versions is not None else _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
    }
    if tuning is not None:
        data["tuning"] = tuning
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def load_launch_config(path, device=None, *, check_device: bool = True) -> LaunchConfig:
    """Read a launch-config file written by :func:`save_launch_config` / ``tune --kernels``.

    Args:
        path: the JSON file.
        device: the device it is meant for (a CUDA device: its name must match the file's
            ``"device"`` unless ``check_device=False``); None: no device check.

    Raises:
        LaunchConfigError: the file cannot be read, is not a launch config, has a bad value (the
            message names the field), or was tuned on another device.
    """
    path = Path(os.fspath(path))
    where = f"launch config {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LaunchConfigError(f"{where}: cannot read it ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LaunchConfigError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LaunchConfigError(f"{where} is not a launch config (no \"format\": \"{FORMAT}\")")
    if data.get("version") != FORMAT_VERSION:
        raise LaunchConfigError(f"{where} has format version {data.get('version')!r}; this package reads "
                                f"version {FORMAT_VERSION}")
    file_device = data.get("device")
    if not isinstance(file_device, str):
        raise LaunchConfigError(f"{where} does not say which device it was tuned on (\"device\")")
    if check_device and device is not None:
        here = _device_name(device)
        if here is not None and here != file_device:
            raise LaunchConfigError(f"{where} was tuned on {file_device!r}, not on this {here!r}; "
                                    "tune this device (python -m cqil_kernels tune --kernels) or pass check_device=False")
    try:
        return LaunchConfig.from_dict(data.get("config", {}), base=heuristic_config("gpu"), where="config",
                                      source=f"{path} (tuned on {file_device})")
    except LaunchConfigError as e:
        raise LaunchConfigError(f"{where}: {e}") from None


def _device_name(device) -> str | None:
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device)


# ---------------------------------------------------------------------------------------------- resolution
_DEFAULTS: dict = {}
_DEFAULTS_LOCK = threading.Lock()


def default_launch_config(device) -> LaunchConfig:
    """The config a launch on ``device`` uses without an override (cached per device).

    CUDA: the package's file for this device name when there is one (a malformed or foreign
    file: a warning, then the heuristics), else ``heuristic_config("gpu")``. Elsewhere (the
    Triton interpreter on the CPU): ``heuristic_config("interpreter")``.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return heuristic_config("interpreter")
    index = device.index if device.index is not None else torch.cuda.current_device()
    cfg = _DEFAULTS.get(index)
    if cfg is None:
        with _DEFAULTS_LOCK:
            cfg = _DEFAULTS.get(index)
            if cfg is None:
                cfg = _DEFAULTS[index] = _discover(torch.device("cuda", index))
    return cfg


def _discover(device) -> LaunchConfig:
    import torch

    name = torch.cuda.get_device_name(device)
    path = config_path_for(name)
    if not path.is_file():
        return heuristic_config("gpu")
    try:
        cfg = load_launch_config(path, device)
    except LaunchConfigError as e:
        warnings.warn(f"{e}; using the built-in heuristics", stacklevel=3)
        return heuristic_config("gpu")
    try:
        import triton

        with open(path, encoding="utf-8") as f:
            tuned_with = (json.load(f).get("versions") or {}).get("triton")
        if tuned_with and tuned_with.split(".")[:2] != triton.__version__.split(".")[:2]:
            warnings.warn(f"launch config {path} was tuned with Triton {tuned_with}, this is Triton "
                          f"{triton.__version__}: its tiles are valid but may no longer be the fastest", stacklevel=3)
    except ImportError:
        pass
    return cfg


# The override of the current context: (base config or None = the device's default, changes).
_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("cqil_launch_config", default=None)


def launch_config_for(device) -> LaunchConfig:
    """The config a launch on ``device`` uses now: the innermost :func:`use_launch_config`
    (its config, or the device's default with its changes), else :func:`default_launch_config`."""
    override = _OVERRIDE.get()
    if override is None:
        return default_launch_config(device)
    base, changes = override
    if base is None:
        base = default_launch_config(device)
    return _with_changes(base, changes) if changes else base


@functools.lru_cache(maxsize=256)
def _with_changes(base: LaunchConfig, changes: tuple) -> LaunchConfig:
    return base.replace(**dict(changes))


class _Scope:
    """The context manager :func:`use_launch_config` returns (a class: the engine enters one at
    every step, so it is kept cheap)."""

    __slots__ = ("_value", "_token")

    def __init__(self, value):
        self._value = value
        self._token = None

    def __enter__(self):
        self._token = _OVERRIDE.set(self._value)
        return self

    def __exit__(self, *exc):
        _OVERRIDE.reset(self._token)
        return False


def use_launch_config(config: "LaunchConfig | str | os.PathLike | None" = None, **changes) -> _Scope:
    """Launches inside the block use ``config`` (a LaunchConfig or a file path) with ``changes``.

    Without ``config`` the changes apply on top of what was current (an outer block's config, or
    each device's default), e.g. ``use_launch_config(splitk_mode="kernel")``. Changes are
    validated when the block is made.

    Example:
        >>> with use_launch_config(prefill_m=None):      # Triton kernels at every size
        ...     pass
    """
    if config is not None and not isinstance(config, LaunchConfig):
        config = load_launch_config(config)
    if config is not None and not changes:  # a whole config, already valid (the engine's every step)
        return _Scope((config, ()))
    fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    unknown = set(changes) - fields
    if unknown:
        raise LaunchConfigError(f"unknown launch config fields {sorted(unknown)}; known: {sorted(fields)}")
    outer = _OVERRIDE.get()
    if config is None and outer is not None:
        base, merged = outer[0], {**dict(outer[1]), **changes}
    else:
        base, merged = config, dict(changes)
    items = tuple(sorted(merged.items()))
    # validate now (not at the first launch inside the block)
    _with_changes(base if base is not None else heuristic_config("gpu"), items)
    return _Scope((base, items))
