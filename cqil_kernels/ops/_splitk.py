"""Split-K machinery shared by the GEMM ops (and the split-KV attention): the split policy, the
arrival counters of the serial finish, the Triton helpers that finish a tile, and the separate
reduction kernel.

How a split-K GEMM finishes is ``LaunchConfig.splitk_mode`` (see ``cqil_kernels.launch_config``):
"serial": each program stores its fp32 partial tile, and the last program to arrive at a tile (an
atomic counter per tile) sums the tile's partials in split order and applies the epilogue itself,
so the GEMM is one launch; "kernel": a second, separate reduction kernel does it. The two add the
same partials in the same order. "serial" relies on the release/acquire pattern of CUTLASS's
serial split-K (CTA barrier, then a gpu-scope acq_rel atomic); the interpreter runs programs one
at a time and cannot exercise it, so the GPU tests repeat split GEMMs and require identical
results every time.
"""

import torch

from ..launch_config import LaunchConfig, launch_config_for
from ._precise import rsqrt_rn, sigmoid_rn
from ._triton import cdiv, tl, triton

__all__ = [
    "pick_split_k", "sm_count", "serial_split", "splitk_reduce", "tile_counters", "reserve_tile_counters",
    "last_to_arrive", "sum_splits",
]


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors the launch config sizes grids for: its override, the tensor's
    GPU's count, or 1 under the interpreter (no split by default; tests force split-K)."""
    return launch_config_for(t.device).sm_count_for(t.device)


def serial_split(t: torch.Tensor) -> bool:
    """True when split partials of a launch for ``t`` are finished by their last program."""
    return launch_config_for(t.device).splitk_mode == "serial"


def pick_split_k(tiles: int, k_blocks: int, t: torch.Tensor, split_k: int | None = None,
                 config: LaunchConfig | None = None) -> tuple[int, int]:
    """Split-K factor and K-blocks per split.

    Decode GEMMs have few output tiles (M=1: one row of N-blocks), far fewer than the SMs, so the
    K reduction is split across programs until about ``programs_per_sm`` programs per SM exist
    (at most ``max_split_k`` splits). ``split_k`` (a test's or a tuned tile's) overrides that.
    Returns (splits, blocks_per_split) with no empty split.
    """
    if split_k is None:
        cfg = config if config is not None else launch_config_for(t.device)
        target = cfg.programs_per_sm * cfg.sm_count_for(t.device)
        split_k = 1 if tiles >= target else min(cdiv(target, tiles), cfg.max_split_k)
    split_k = max(1, min(int(split_k), k_blocks))
    per_split = cdiv(k_blocks, split_k)
    return cdiv(k_blocks, per_split), per_split


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr, ss_ptr, b_ptr, res_ptr, attn_ptr, out_ptr,
    R, NOUT, SPLITS, SS_SPLIT_STRIDE, ROWS_PER_BIAS, NATTN, inv_k, eps,
    stride_bg, stride_bn,
    stride_rr, stride_rn,
    stride_ap, stride_ar, stride_an,
    stride_or, stride_on,
    HAS_SS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_ATTN: tl.constexpr, GLU: tl.constexpr,
    BR: tl.constexpr, BN: tl.constexpr,
):
    # out[r, n] = epilogue(sum_s ws[s, r, n]); ws is a contiguous fp32 [SPLITS, R, NW] buffer with
    # NW = 2*NOUT for GLU (gate columns then up columns) and NOUT otherwise.
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rr = pid_r * BR + tl.arange(0, BR)
    rn = pid_n * BN + tl.arange(0, BN)
    r_mask = rr < R
    n_mask = rn < NOUT
    mask = r_mask[:, None] & n_mask[None, :]
    rr64 = rr.to(tl.int64)
    if GLU:
        NW = NOUT * 2
    else:
        NW = NOUT
    acc = tl.zeros((BR, BN), dtype=tl.float32)
    acc_u = tl.zeros((BR, BN), dtype=tl.float32)
    ss = tl.zeros((BR,), dtype=tl.float32)
    base = ws_ptr + rr64[:, None] * NW + rn[None, :]
    ss_base = ss_ptr + rr
    for _s in range(0, SPLITS):
        acc += tl.load(base, mask=mask, other=0.0)
        if GLU:
            acc_u += tl.load(base + NOUT, mask=mask, other=0.0)
        if HAS_SS:
            ss += tl.load(ss_base, mask=r_mask, other=0.0)
        # Advance by one split (pointer increments keep 64-bit addresses without casting the
        # induction variable).
        base += R * NW
        ss_base += SS_SPLIT_STRIDE
    if HAS_SS:
        rstd = rsqrt_rn(ss * inv_k + eps)
        acc = acc * rstd[:, None]
        acc_u = acc_u * rstd[:, None]
    if HAS_BIAS:
        g = rr // ROWS_PER_BIAS
        acc += tl.load(b_ptr + g[:, None] * stride_bg + rn[None, :] * stride_bn, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        acc += tl.load(res_ptr + rr64[:, None] * stride_rr + rn[None, :] * stride_rn, mask=mask, other=0.0).to(tl.float32)
    if HAS_ATTN:
        for p in range(0, NATTN):
            acc += tl.load(
                attn_ptr + p * stride_ap + rr64[:, None] * stride_ar + rn[None, :] * stride_an,
                mask=mask, other=0.0,
            ).to(tl.float32)
    if GLU:
        acc = acc * sigmoid_rn(acc) * acc_u
    tl.store(out_ptr + rr64[:, None] * stride_or + rn[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def splitk_reduce(ws, out2d, *, splits, ss=None, inv_k=0.0, eps=0.0, bias2d=None, rows_per_bias=1,
                  residual=None, attn=None, glu=False):
    """Sum the split-K partials and apply the epilogue (a second launch: ``splitk_mode="kernel"``,
    or a consumer that needs the sums). ``out2d`` is [R, NOUT] (any strides); ``ss`` is
    [splits, n_blocks, R] (n-block 0 is read); ``bias2d`` is [G, NOUT] indexed by
    row // rows_per_bias; ``attn`` is [P, R, NOUT]."""
    R, NOUT = out2d.shape
    BR, BN = launch_config_for(out2d.device).reduce_block
    dummy = out2d
    grid = (cdiv(R, BR), cdiv(NOUT, BN))
    _splitk_reduce_kernel[grid](
        ws, ss if ss is not None else ws,
        bias2d if bias2d is not None else dummy,
        residual if residual is not None else dummy,
        attn if attn is not None else dummy,
        out2d,
        R, NOUT, splits, ss.stride(0) if ss is not None else 0, rows_per_bias,
        attn.shape[0] if attn is not None else 0, inv_k, eps,
        *(bias2d.stride() if bias2d is not None else (0, 0)),
        *(residual.stride() if residual is not None else (0, 0)),
        *(attn.stride() if attn is not None else (0, 0, 0)),
        *out2d.stride(),
        HAS_SS=ss is not None, HAS_BIAS=bias2d is not None, HAS_RES=residual is not None,
        HAS_ATTN=attn is not None, GLU=glu, BR=BR, BN=BN, num_warps=4,
    )
    return out2d


# ---- arrival counters of the serial finish
_COUNTERS: dict = {}  # device -> the int32 counter buffer every split launch on that device uses
# device -> buffers replaced by a larger one. They stay alive: a CUDA graph captured before the
# growth still addresses its buffer, and freeing it would let every later replay write into
# whatever tensor the allocator put there next.
_RETIRED: dict = {}


# A heuristic split happens only below two programs per SM (pick_split_k, and decode attention's
# B*P*nkv programs), so heuristic launches need fewer counters than this on any GPU. Explicit
# split counts, or a decode attention with more (batch, layer, kv head) programs, can need more:
# whoever captures graphs reserves its maximum up front (DecodeEngine does).
_RESERVED_TILES = 4096


def _capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on ``device``'s current stream."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def tile_counters(t: torch.Tensor, tiles: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for ``tiles`` output tiles on t's device.

    One buffer per device, reused by every split launch: a tile's last program resets its
    counter, so the buffer is all zeros again when the kernel ends. Kernels that use it must not
    run concurrently on two streams.

    The buffer only grows, and only outside CUDA-graph capture: growing it inside a capture
    raises a RuntimeError (reserve first with :func:`reserve_tile_counters`), and a buffer
    replaced by a larger one is kept alive for the graphs captured with it. ``convert(backend=
    "triton")`` and ``DecodeEngine`` reserve up front, so the buffer is also never first
    allocated inside a compiled region's private memory pool (whose state cudagraph trees may
    rewind, which would hand the live counters to other tensors).
    """
    buf = _COUNTERS.get(t.device)
    if buf is None or buf.numel() < tiles:
        have = 0 if buf is None else buf.numel()
        if _capturing(t.device):
            raise RuntimeError(
                f"a split launch needs {tiles} split-K arrival counters on {t.device}, {have} are reserved, and a "
                "CUDA graph is being captured, where the buffer cannot grow (graphs captured earlier would keep "
                f"addressing the old one). Call cqil_kernels.ops.reserve_tile_counters('{t.device}', {tiles}) "
                "before capturing (DecodeEngine reserves for its max_batch_size)."
            )
        if buf is not None:
            _RETIRED.setdefault(t.device, []).append(buf)
        buf = torch.zeros(max(int(tiles), _RESERVED_TILES), dtype=torch.int32, device=t.device)
        _COUNTERS[t.device] = buf
    return buf


def reserve_tile_counters(device, tiles: int = 0) -> torch.Tensor:
    """Make ``device``'s split-K arrival counters hold at least ``tiles`` (and at least the
    default reserve); returns the buffer. Call it outside graph capture and compilation, with the
    most counters any later launch needs: a split decode attention needs batch x layers of the
    group x kv heads, a split GEMM its output tiles (fewer than 2 per SM under the heuristics).

    Example:
        >>> reserve_tile_counters("cuda", 8 * 32 * 32)   # batch 8, up to 32 layers, 32 kv heads
    """
    if isinstance(tiles, bool) or not isinstance(tiles, int):
        raise TypeError(f"tiles must be an int, got {type(tiles).__name__}")
    if tiles < 0:
        raise ValueError(f"tiles must be >= 0, got {tiles}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return tile_counters(torch.empty(0, device=device), max(tiles, _RESERVED_TILES))


@triton.jit
def last_to_arrive(cnt_ptr, SPLITS):
    """Count this program's arrival at its tile; True for the last of the tile's SPLITS programs
    (which also resets the counter for the next launch)."""
    # every thread's partial-tile stores happen before the release of the atomic below
    tl.debug_barrier()
    prev = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    last = prev == SPLITS - 1
    if last:
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def sum_splits(ptrs, split_stride, SPLITS, mask):
    """Sum of the SPLITS fp32 partial blocks (any shape) at ``ptrs + s * split_stride``, in split
    order. The loads skip L1 (.cg): L1 is not coherent with other SMs' stores."""
    acc = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    for _s in range(1, SPLITS):
        ptrs += split_stride
        acc += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    return acc
