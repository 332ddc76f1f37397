"""Kernel tuning on a GPU: sweep tiles, warps, stages and split counts of a model's decode GEMMs and
write the per-device launch-config file (``cqil_kernels.launch_config``).

For the shapes of the model at hand (:func:`model_gemm_shapes`: every grouped GEMM at M = the
decode batch, for P = 1 and the group sizes asked for, and the LM head) each candidate tile
(:func:`gemm_candidates`, then split counts around the policy's choice, :func:`split_candidates`)
is verified against the torch reference and timed:

- inside a CUDA graph (launch overhead as the decode engine sees it), replayed many times and
  timed with CUDA events;
- with L2 flushed between calls: the graph calls the op once per *copy* of the weights, with
  enough copies that they exceed twice the L2 cache (:func:`weight_copies`), so every call reads
  its weights from HBM as a decode step does.

The best tile per shape becomes an exact-shape row of the config (the heuristics stay the
fallback for every other shape); the split-K finishing mode and the decode attention's tile are
chosen the same way. The compiled CUDA attention (``csrc``), where built, is timed beside the
Triton one and reported. On a CPU :func:`tune_kernels` refuses: interpreter timings say nothing.

Candidate generation, the config assembly and the file writing are plain functions, tested on
the CPU; only :func:`time_gemm` / :func:`time_attention` need a GPU.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .launch_config import (
    AttentionTile,
    GemmTile,
    LaunchConfig,
    TileRule,
    config_path_for,
    device_file_name,
    heuristic_config,
    save_launch_config,
    shape_class,
    use_launch_config,
)

__all__ = [
    "GemmShape", "model_gemm_shapes", "gemm_candidates", "split_candidates", "policy_split", "weight_copies",
    "shared_memory_bytes", "build_config", "KernelTuneResult", "tune_kernels", "time_gemm", "time_attention",
    "make_gemm_case",
]

H100_SMEM = 227 * 1024  # bytes of shared memory one block may use on sm_90
DEFAULT_L2 = 50 * 1024 * 1024  # H100 L2 (50 MB) when the device does not report it


# ---------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class GemmShape:
    """One grouped-GEMM launch: ``op`` at M rows, per-layer output width N, reduction K, P layers.
    ``parts``: qkv_gemm's per-layer part widths (q, k, v), summing to N."""

    op: str
    M: int
    N: int
    K: int
    P: int
    parts: tuple[int, ...] | None = None

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.N, self.K, self.P)

    @property
    def label(self) -> str:
        return f"{self.op} M{self.M} N{self.N} K{self.K} P{self.P}"

    def weight_bytes(self, elem: int) -> int:
        n = 2 * self.N if self.op == "gate_up_silu" else self.N  # gate and up
        return self.P * n * self.K * elem


def _dims(config) -> dict:
    H = config.hidden_size
    nh = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nh
    D = getattr(config, "head_dim", None) or H // nh
    return dict(H=H, nh=nh, nkv=nkv, D=D, I=config.intermediate_size, V=config.vocab_size)


def model_gemm_shapes(config, batch_sizes: Sequence[int] = (1,), parallel: Sequence[int] = (1, 2)) -> list[GemmShape]:
    """Every grouped GEMM a decode step of this model runs, at M = each batch size and P = each of
    ``parallel`` (1: an ungrouped layer), plus the LM head (final norm + head as one qkv_gemm).

    Example:
        >>> [s.label for s in model_gemm_shapes(cfg, (1,), (2,))][:2]   # doctest: +SKIP
        ['qkv_gemm M1 N960 K576 P2', 'batched_gemm M1 N576 K576 P2']
    """
    d = _dims(config)
    H, nh, nkv, D, I, V = (d[k] for k in ("H", "nh", "nkv", "D", "I", "V"))
    out = []
    for M in batch_sizes:
        for P in sorted(set(parallel)):
            out += [
                GemmShape("qkv_gemm", M, (nh + 2 * nkv) * D, H, P, (nh * D, nkv * D, nkv * D)),
                GemmShape("batched_gemm", M, H, nh * D, P),
                GemmShape("gate_up_silu", M, I, H, P),
                GemmShape("down_sum", M, H, I, P),
            ]
        out.append(GemmShape("qkv_gemm", M, V, H, 1, (V,)))
    seen, unique = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


# ---------------------------------------------------------------------------------------------- candidates
def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def shared_memory_bytes(shape: GemmShape, tile: GemmTile, elem: int) -> int:
    """Shared memory of the K-loop pipeline: ``num_stages`` buffers of the A tile and the weight
    tile(s) (gate_up_silu streams two weight tiles)."""
    b_tiles = 2 if shape.op == "gate_up_silu" else 1
    return tile.num_stages * (tile.BM * tile.BK + b_tiles * tile.BK * tile.BN) * elem


def gemm_candidates(shape: GemmShape, *, quick: bool = False, elem: int = 2,
                    smem_limit: int = H100_SMEM) -> list[GemmTile]:
    """Tiles worth timing for ``shape`` (the split count left to the policy).

    Decode rows use BM = 16 (the smallest tl.dot tile); wider K tiles and more stages keep more
    weight bytes in flight. A tile wider than the (padded) dimension only masks work, and one
    whose pipeline exceeds the shared memory cannot launch: both are left out; gate_up_silu keeps
    BN x BK <= 64 x 128 (two fp32 accumulators and two weight tiles: larger ones spill).
    """
    cls = shape_class(shape.M)
    bms = {"decode": (16,), "mid": (32, 64), "prefill": (64, 128)}[cls]
    bns = (64, 128) if quick else (32, 64, 128)
    bks = (64, 128) if quick else (64, 128, 256)
    warps = (4,) if quick else (4, 8)
    stages = (3, 4) if quick else (3, 4, 5)
    widest = max(shape.parts) if shape.parts else shape.N
    out = []
    for BM in bms:
        for BN in bns:
            if BN > max(32, _pow2_at_least(widest)):
                continue
            for BK in bks:
                if BK > max(64, _pow2_at_least(shape.K)):
                    continue
                if shape.op == "gate_up_silu" and BN * BK > 64 * 128:
                    continue
                for w in warps:
                    for s in stages:
                        tile = GemmTile(BM, BN, BK, w, s)
                        if shared_memory_bytes(shape, tile, elem) <= smem_limit:
                            out.append(tile)
    return out


def _tiles_of(shape: GemmShape, tile: GemmTile) -> tuple[int, int]:
    """(output tiles, K blocks) of a launch, as the op computes them."""
    mb = -(-shape.M // tile.BM)
    if shape.op == "qkv_gemm":
        nb = sum(-(-n // tile.BN) for n in (shape.parts or (shape.N,)))
        return mb * nb * shape.P, -(-shape.K // tile.BK)
    nb = -(-shape.N // tile.BN)
    if shape.op == "down_sum":
        return mb * nb, shape.P * -(-shape.K // tile.BK)
    return mb * nb * shape.P, -(-shape.K // tile.BK)


def policy_split(shape: GemmShape, tile: GemmTile, config: LaunchConfig, sm_count: int) -> int:
    """The split count the config's policy gives this launch (as ``ops._splitk.pick_split_k``)."""
    tiles, k_blocks = _tiles_of(shape, tile)
    target = config.programs_per_sm * sm_count
    split = 1 if tiles >= target else min(-(-target // tiles), config.max_split_k)
    split = max(1, min(split, k_blocks))
    per = -(-k_blocks // split)
    return -(-k_blocks // per)


def split_candidates(shape: GemmShape, tile: GemmTile, config: LaunchConfig, sm_count: int) -> list[int]:
    """Split counts to try with a chosen tile: 1, and half, the same as and twice the policy's
    choice (each at most the K blocks and 64), without repeats."""
    _, k_blocks = _tiles_of(shape, tile)
    s0 = policy_split(shape, tile, config, sm_count)
    values = {1, max(1, s0 // 2), s0, s0 * 2}
    return sorted(v for v in values if 1 <= v <= min(64, k_blocks))


def weight_copies(weight_bytes: int, l2_bytes: int, cap_bytes: int = 4 << 30) -> int:
    """Copies of a launch's weights so that consecutive calls never hit L2: their total is at least
    twice the L2 size (at least 2 copies; at most ``cap_bytes`` in all, if one copy allows)."""
    if weight_bytes <= 0:
        raise ValueError("weight_bytes must be positive")
    n = max(2, -(-2 * l2_bytes // weight_bytes) + 1)
    return max(2, min(n, cap_bytes // weight_bytes))


def build_config(best: dict, base: LaunchConfig, splitk_mode: str | None = None,
                 attention: AttentionTile | None = None, source: str = "tune --kernels") -> LaunchConfig:
    """The tuned config: ``base`` plus one exact-shape row per tuned shape (``best``: GemmShape ->
    GemmTile), and the chosen split-K mode and attention tile."""
    rules = [TileRule(s.op, shape_class(s.M), t, shape=s.key) for s, t in best.items()]
    # one row per (op, class, shape): the first batch size tuned wins for a shape seen at several M
    unique, seen = [], set()
    for r in rules:
        if r.key not in seen:
            seen.add(r.key)
            unique.append(r)
    cfg = base.with_rules(unique, source=source)
    changes = {}
    if splitk_mode is not None:
        changes["splitk_mode"] = splitk_mode
    if attention is not None:
        changes["attention"] = attention
    return cfg.replace(source=source, **changes) if changes else cfg


# ---------------------------------------------------------------------------------------------- timing (GPU)
def make_gemm_case(shape: GemmShape, device, dtype, l2_bytes: int, seed: int = 0):
    """Inputs of ``shape`` with enough weight copies to flush L2 (:func:`weight_copies`):
    (call(i) running the op on copy i, reference() of copy 0, copies). Built once per shape."""
    elem = torch.finfo(dtype).bits // 8
    copies = weight_copies(shape.weight_bytes(elem), l2_bytes)
    call, reference = _gemm_case(shape, device, dtype, copies, seed)
    return call, reference, copies


def _gemm_case(shape: GemmShape, device, dtype, copies: int, seed: int = 0):
    """(call(i) running the op on weight copy i, reference output of copy 0)."""
    from .ops.batched_gemm import batched_gemm_reference, batched_gemm_triton
    from .ops.down_sum import down_sum_reference, down_sum_triton
    from .ops.gate_up import gate_up_silu_reference, gate_up_silu_triton
    from .ops.qkv_gemm import qkv_gemm_reference, qkv_gemm_triton

    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s, scale=1.0):  # drawn on the device: weight copies of a 7B layer are hundreds of MB
        return (torch.randn(*s, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    M, N, K, P = shape.M, shape.N, shape.K, shape.P
    ws = K ** -0.5
    if shape.op == "qkv_gemm":
        x = rnd(M, K)
        norms = [(1 + 0.1 * rnd(K)) for _ in range(P)]
        sets = [[rnd(n, K, scale=ws) for _ in range(P) for n in shape.parts] for _ in range(copies)]
        return (lambda i: qkv_gemm_triton(x, norms, sets[i], None, 1e-6),
                lambda: qkv_gemm_reference(x, norms, sets[0], None, 1e-6))
    if shape.op == "batched_gemm":
        x = rnd(P, M, K)
        sets = [[rnd(N, K, scale=ws) for _ in range(P)] for _ in range(copies)]
        return lambda i: batched_gemm_triton(x, sets[i]), lambda: batched_gemm_reference(x, sets[0])
    if shape.op == "gate_up_silu":
        a, res = rnd(P, M, K), rnd(M, K)
        norms = [(1 + 0.1 * rnd(K)) for _ in range(P)]
        sets = [([rnd(N, K, scale=ws) for _ in range(P)], [rnd(N, K, scale=ws) for _ in range(P)])
                for _ in range(copies)]
        return (lambda i: gate_up_silu_triton(a, norms, sets[i][0], sets[i][1], 1e-6, res, 0),
                lambda: gate_up_silu_reference(a, norms, sets[0][0], sets[0][1], 1e-6, res, 0))
    if shape.op == "down_sum":
        m, res, attn = rnd(P, M, K), rnd(M, N), rnd(P, M, N)
        sets = [[rnd(N, K, scale=(P * K) ** -0.5) for _ in range(P)] for _ in range(copies)]
        return lambda i: down_sum_triton(m, sets[i], res, attn), lambda: down_sum_reference(m, sets[0], res, attn)
    raise ValueError(f"unknown op {shape.op!r}")


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    scale = float(want.float().abs().max()) or 1.0
    return bool(torch.isfinite(got).all()) and float((got.float() - want.float()).abs().max()) <= 2e-2 * scale


def _graph_time_us(call, copies: int, replays: int) -> float:
    """µs per call: a CUDA graph of one call per weight copy, replayed, timed with events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):  # warm: JIT, weight tables of every copy (a capture cannot build them)
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * copies)


def time_gemm(shape: GemmShape, config: LaunchConfig, case, dtype, replays: int = 20) -> dict:
    """Verify, then time ``shape`` under ``config`` on ``case`` (:func:`make_gemm_case`; L2
    flushed, CUDA graph): {"ok", "us", "gbps", "copies"} or {"ok": False, "error"}."""
    elem = torch.finfo(dtype).bits // 8
    call, reference, copies = case
    try:
        with use_launch_config(config):
            if not _close(call(0), reference()):
                return {"ok": False, "error": "result differs from the torch reference"}
            us = _graph_time_us(call, copies, replays)
    except Exception as e:  # a tile that does not compile or launch here is a measured outcome, not a crash
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return {"ok": True, "us": us, "gbps": shape.weight_bytes(elem) / (us * 1e3), "copies": copies}


def time_attention(batch: int, P: int, nh: int, nkv: int, D: int, S: int, device, dtype, impl: str,
                   config: LaunchConfig | None = None, replays: int = 20) -> dict:
    """Decode attention of P layers over a cache of S positions: ``impl`` "triton" (under
    ``config``) or "csrc" (the compiled CUDA kernel); µs per call in a CUDA graph."""
    from . import compiled
    from .ops import decode_attention_reference
    from .ops.decode_attention import decode_attention_triton

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, P * nh, D, generator=g, device=device).to(dtype)
    kv = torch.randn(2, P, batch, nkv, S, D, generator=g, device=device).to(dtype)  # one buffer: no stacking copy
    ks, vs = list(kv[0]), list(kv[1])
    mask = torch.ones(batch, S, dtype=torch.bool, device=device)
    scale = D ** -0.5
    if impl == "csrc":
        if not compiled.cuda_built() or not compiled.register_ops():
            return {"ok": False, "error": "cqil_kernels._C has no CUDA build here"}
        fn = lambda i: compiled.decode_attention(q, ks, vs, mask, S, scale)  # noqa: E731
    else:
        fn = lambda i: decode_attention_triton(q, ks, vs, mask, S, scale)  # noqa: E731
    try:
        with use_launch_config(config) if config is not None else _nullcontext():
            if not _close(fn(0), decode_attention_reference(q, ks, vs, mask, S, scale)):
                return {"ok": False, "error": "result differs from the torch reference"}
            us = _graph_time_us(fn, 1, replays)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    kv_bytes = 2 * P * batch * nkv * S * D * (torch.finfo(dtype).bits // 8)
    return {"ok": True, "us": us, "gbps": kv_bytes / (us * 1e3)}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------- the sweep
@dataclass
class KernelTuneResult:
    """Per-shape rows (heuristic and best timings), the tuned config, attention rows."""

    device_name: str
    dtype: str
    rows: list
    config: LaunchConfig
    attention_rows: list = field(default_factory=list)
    splitk_rows: list = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False
    environment: dict = field(default_factory=dict)

    def table(self) -> str:
        from .report import format_table

        rows = [[r["shape"], r["heuristic_us"], r["best_us"],
                 (r["heuristic_us"] / r["best_us"]) if r.get("heuristic_us") and r.get("best_us") else None,
                 r.get("best_gbps"), r["best_tile"], r["candidates_timed"]] for r in self.rows]
        text = [f"kernel tuning MEASURED on {self.device_name} ({self.dtype}; CUDA graph, L2 flushed by rotating "
                "weight copies)",
                format_table(["shape", "heuristic us", "best us", "x", "best GB/s", "best tile", "timed"], rows)]
        if self.attention_rows:
            text.append(format_table(["attention", "impl", "tile", "us", "GB/s"],
                                     [[a["shape"], a["impl"], a.get("tile", "-"), a.get("us"), a.get("gbps")]
                                      for a in self.attention_rows]))
        if self.stopped_early:
            text.append("stopped at the time budget: shapes after it keep the heuristics")
        return "\n".join(text)

    def to_tuning(self) -> dict:
        return {"rows": self.rows, "attention": self.attention_rows, "splitk_mode": self.splitk_rows,
                "seconds": self.seconds, "stopped_early": self.stopped_early, "dtype": self.dtype,
                "environment": self.environment}

    def write(self, out_dir, install: bool = False) -> dict:
        """The per-device file into ``out_dir`` (and, with ``install``, where launches find it)."""
        out = Path(out_dir)
        path = save_launch_config(self.config, out / device_file_name(self.device_name), device_name=self.device_name,
                                  tuning=self.to_tuning())
        paths = {"config": path}
        if install:
            target = config_path_for(self.device_name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            paths["installed"] = target
        return paths


def _tile_str(t: GemmTile) -> str:
    return f"{t.BM}x{t.BN}x{t.BK} w{t.num_warps} s{t.num_stages}" + (f" split{t.split_k}" if t.split_k else "")


def _sweep_shape(shape, base, case, dtype, sm_count, quick, deadline, progress_bar) -> tuple[dict, GemmTile | None]:
    import dataclasses

    cls = shape_class(shape.M)
    elem = torch.finfo(dtype).bits // 8
    heuristic = base.gemm_tile(shape.op, shape.M, *shape.key)
    h = time_gemm(shape, base, case, dtype)
    timed = [(heuristic, h)]
    for tile in gemm_candidates(shape, quick=quick, elem=elem):
        if time.perf_counter() > deadline:
            break
        if tile == dataclasses.replace(heuristic, split_k=None):
            continue
        timed.append((tile, time_gemm(shape, base.with_rules([TileRule(shape.op, cls, tile, shape=shape.key)]),
                                      case, dtype)))
        progress_bar.update(1)
    ok = [(t, r) for t, r in timed if r["ok"]]
    best_tile, best = min(ok, key=lambda tr: tr[1]["us"]) if ok else (None, None)
    if best_tile is not None:  # split counts around the policy's choice for the best tile
        for s in split_candidates(shape, best_tile, base, sm_count):
            if time.perf_counter() > deadline:
                break
            t = dataclasses.replace(best_tile, split_k=s)
            r = time_gemm(shape, base.with_rules([TileRule(shape.op, cls, t, shape=shape.key)]), case, dtype)
            timed.append((t, r))
            if r["ok"] and r["us"] < best["us"]:
                best_tile, best = t, r
    row = {"shape": shape.label, "op": shape.op, "M": shape.M, "N": shape.N, "K": shape.K, "P": shape.P,
           "heuristic_tile": _tile_str(heuristic), "heuristic_us": h.get("us"),
           "best_tile": _tile_str(best_tile) if best_tile else "-", "best_us": best["us"] if best else None,
           "best_gbps": best["gbps"] if best else None, "candidates_timed": len(timed),
           "failed": sum(not r["ok"] for _, r in timed)}
    # keep the heuristic unless a candidate beat it (a row equal to the heuristic adds nothing)
    chosen = best_tile if best and h.get("us") and best["us"] < h["us"] and best_tile != heuristic else None
    return row, chosen


def tune_kernels(config, *, device="cuda", dtype=torch.bfloat16, batch_sizes: Sequence[int] = (1,),
                 parallel: Sequence[int] = (1, 2), context_length: int = 1024, quick: bool = False,
                 time_budget_s: float = 420.0, progress: bool = True) -> KernelTuneResult:
    """Sweep the decode kernels of a model (HF ``config``) on ``device``; returns the tuned config.

    Raises:
        ValueError: ``device`` is not a CUDA device (interpreter timings mean nothing).
    """
    from tqdm.auto import tqdm

    from .report import environment

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"kernel tuning needs a CUDA GPU, not {device}: Triton interpreter timings on a CPU say "
                         "nothing about the GPU kernels")
    t0 = time.perf_counter()
    deadline = t0 + time_budget_s
    props = torch.cuda.get_device_properties(device)
    l2 = int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2)
    name = torch.cuda.get_device_name(device)
    base = heuristic_config("gpu")
    sm = base.sm_count_for(device)
    shapes = model_gemm_shapes(config, batch_sizes, parallel)
    elem = torch.finfo(dtype).bits // 8
    total = sum(len(gemm_candidates(s, quick=quick, elem=elem)) for s in shapes)
    bar = tqdm(total=total, desc="tune kernels", unit="tile", disable=not progress, leave=False)
    rows, best = [], {}
    with torch.cuda.device(device):
        for s in shapes:
            if time.perf_counter() > deadline:
                rows.append({"shape": s.label, "heuristic_us": None, "best_us": None, "best_tile": "- (time budget)",
                             "candidates_timed": 0})
                continue
            case = make_gemm_case(s, device, dtype, l2)
            row, chosen = _sweep_shape(s, base, case, dtype, sm, quick, deadline, bar)
            del case
            rows.append(row)
            if chosen is not None:
                best[s] = chosen
            torch.cuda.empty_cache()
        bar.close()
        tuned = build_config(best, base, source=f"tune --kernels on {name}")
        mode, mode_rows = _choose_splitk_mode(shapes, tuned, device, dtype, l2)
        att, att_rows = _tune_attention(config, tuned, device, dtype, batch_sizes[0], parallel, context_length,
                                        quick, deadline)
    final = build_config(best, base, splitk_mode=mode, attention=att, source=f"tune --kernels on {name}")
    return KernelTuneResult(device_name=name, dtype=str(dtype).removeprefix("torch."), rows=rows, config=final,
                            attention_rows=att_rows, splitk_rows=mode_rows, seconds=time.perf_counter() - t0,
                            stopped_early=time.perf_counter() > deadline, environment=environment(str(device)))


def _choose_splitk_mode(shapes, tuned: LaunchConfig, device, dtype, l2) -> tuple[str, list]:
    """"serial" or "kernel" by the summed time of every decode shape under the tuned tiles."""
    times = {"serial": [], "kernel": []}
    for s in shapes:  # one case per shape at a time (a 7B shape's weight copies are large)
        case = make_gemm_case(s, device, dtype, l2)
        for mode in times:
            times[mode].append(time_gemm(s, tuned.replace(splitk_mode=mode), case, dtype))
        del case
        torch.cuda.empty_cache()
    totals, rows = {}, []
    for mode in ("serial", "kernel"):
        if all(t["ok"] for t in times[mode]):
            totals[mode] = sum(t["us"] for t in times[mode])
        rows.append({"splitk_mode": mode, "total_us": totals.get(mode),
                     "failed": [s.label for s, t in zip(shapes, times[mode]) if not t["ok"]]})
    return (min(totals, key=totals.get) if totals else tuned.splitk_mode), rows


def _tune_attention(config, tuned, device, dtype, batch, parallel, S, quick, deadline) -> tuple[AttentionTile, list]:
    d = _dims(config)
    rows, best = [], None
    P = max(parallel)
    label = f"B{batch} P{P} nh{d['nh']} nkv{d['nkv']} D{d['D']} S{S}"
    candidates = [AttentionTile(bn, w, st) for bn in (32, 64, 128) for w in ((4,) if quick else (2, 4, 8))
                  for st in ((2,) if quick else (1, 2, 3))]
    for tile in candidates:
        if time.perf_counter() > deadline:
            break
        r = time_attention(batch, P, d["nh"], d["nkv"], d["D"], S, device, dtype, "triton",
                           tuned.replace(attention=tile))
        rows.append({"shape": label, "impl": "triton", "tile": f"n{tile.block_n} w{tile.num_warps} s{tile.num_stages}",
                     **r})
        if r["ok"] and (best is None or r["us"] < best[1]):
            best = (tile, r["us"])
    csrc = time_attention(batch, P, d["nh"], d["nkv"], d["D"], S, device, dtype, "csrc")
    rows.append({"shape": label, "impl": "csrc (compiled CUDA; backend '+csrc')", **csrc})
    return (best[0] if best else tuned.attention), rows
