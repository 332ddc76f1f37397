"""Shared plumbing for the CQIL ops: the optional Triton import, dispatch, launch heuristics and
the split-K reduction kernel used by every GEMM op.

Triton is optional. When it is missing, ``triton.jit`` becomes a no-op decorator and ``tl`` a stub
that only has to survive the kernel *definitions* (``tl.constexpr`` annotations); no kernel is
ever launched then, because :func:`use_triton` returns False and every op takes its torch
reference path.
"""

import functools
import os

import torch

try:  # Triton is an optional dependency ([triton] extra; CUDA wheels of torch bring it).
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    HAS_TRITON = False

    class _TritonStub:
        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(0, int(n) - 1).bit_length()

    class _TlStub:
        constexpr = object()

    triton = _TritonStub()
    tl = _TlStub()

# The interpreter is chosen when a kernel is *decorated* (module import), not when it runs, so a
# CPU launch is only safe if TRITON_INTERPRET was already "1" when this module was imported.
INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"

# Tests flip this to fill split-K workspaces with NaN, so a split that skips its slice cannot pass.
POISON_WORKSPACE = False

# When set, launch heuristics size grids for this many SMs instead of asking the device (1 under
# the interpreter) and use the GPU's tile sizes under the interpreter too. Launch counting on the
# CPU sets it to the H100's 132, so the interpreted run takes the same split decisions (and so
# launches the same kernels) as the GPU would.
SM_COUNT_OVERRIDE: int | None = None


def triton_usable(device) -> bool:
    """True when a Triton kernel can run for tensors on ``device``.

    Triton must be importable and either the device is CUDA (compiled kernels) or the
    interpreter is on (``TRITON_INTERPRET=1``, checked now and when the kernels were decorated).
    """
    if not HAS_TRITON:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return (
        device.type == "cpu"
        and os.environ.get("TRITON_INTERPRET") == "1"
        and INTERPRETED_AT_IMPORT
    )


def use_triton(t: torch.Tensor) -> bool:
    """Dispatch rule of every public op: Triton on CUDA or under the interpreter, else torch."""
    return triton_usable(t.device)


def interpreted(t: torch.Tensor) -> bool:
    """True when a launch for ``t`` goes through the Triton interpreter (not on a GPU). On first
    use it also applies :func:`_interpreter_numpy_compat`."""
    if t.device.type == "cuda":
        return False
    _interpreter_numpy_compat()
    return True


@functools.lru_cache(maxsize=None)
def _interpreter_numpy_compat() -> None:
    """Let the Triton 3.6 interpreter run ``range(runtime_scalar)`` loops under NumPy >= 2.4.

    The interpreter wraps every scalar kernel argument as a 1-element array and implements
    ``tensor.__index__`` as ``int(array)``, which NumPy 2.4 rejects for arrays with ndim > 0; so
    any K loop with a runtime bound fails on the CPU. Kernels must keep runtime bounds (a
    constexpr bound recompiles per shape on the GPU), so the interpreter's ``__index__`` is
    redefined to read the single element. Applied lazily at the first interpreted launch, only
    when NumPy actually refuses the conversion; compiled GPU kernels are unaffected.
    """
    if not HAS_TRITON:
        return
    import numpy as np

    try:
        int(np.array([1]))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_cqil_compat", False):
        return

    def _index(self):
        data = self.handle.data
        return int(data.reshape(-1)[0]) if data.size == 1 else int(data)

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    patched._cqil_compat = True
    interpreter._patch_lang_tensor = patched


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of the tensor's GPU; 1 under the interpreter (no split by default,
    tests force split-K explicitly)."""
    if SM_COUNT_OVERRIDE is not None:
        return int(SM_COUNT_OVERRIDE)
    if t.device.type != "cuda":
        return 1
    return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


def dot_flags(dtype: torch.dtype, t: torch.Tensor) -> tuple[bool, str]:
    """(UPCAST, DOT_PREC) constexprs for tl.dot.

    UPCAST: the interpreter computes bf16 tl.dot wrongly, so bf16 operands are upcast to fp32
    there (never on the GPU, where bf16 tensor cores are the point). The interpreter also rounds
    fp32 -> bf16 casts towards zero, so under UPCAST kernels keep operands they computed in fp32.
    DOT_PREC: fp32 inputs must not silently go through TF32 (torch's F.linear does not by default).
    """
    upcast = interpreted(t) and dtype == torch.bfloat16
    prec = "ieee" if dtype == torch.float32 or upcast else "tf32"
    return upcast, prec


def gemm_blocks(M: int, t: torch.Tensor) -> dict:
    """Tile sizes for the skinny-to-square GEMMs. Decode (M <= 16) streams weights: wide K tiles and
    several stages keep enough bytes in flight; larger M moves towards a compute tile. Fixed
    heuristics instead of autotuning: autotune would re-benchmark inside CUDA-graph capture and is
    very slow under the interpreter. To be tuned on the H100 (benchmarks/NOTES.md)."""
    if interpreted(t) and SM_COUNT_OVERRIDE is None:
        # The interpreter's cost is per tl operation, so few large-ish tiles are cheapest. (With
        # SM_COUNT_OVERRIDE the GPU's tiles are used, so a launch count matches the GPU's.)
        return dict(BM=16, BN=32, BK=32, num_warps=4, num_stages=1)
    if M <= 16:
        return dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=4)
    return dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)


def pick_split_k(tiles: int, k_blocks: int, t: torch.Tensor, split_k: int | None = None) -> tuple[int, int]:
    """Split-K factor and K-blocks per split.

    Decode GEMMs have few output tiles (M=1: one row of N-blocks), far fewer than the SMs, so the
    K reduction is split across programs until about two programs per SM exist. Returns
    (splits, blocks_per_split) with no empty split.
    """
    if split_k is None:
        target = 2 * sm_count(t)
        split_k = 1 if tiles >= target else min(cdiv(target, tiles), 32)
    split_k = max(1, min(int(split_k), k_blocks))
    per_split = cdiv(k_blocks, split_k)
    return cdiv(k_blocks, per_split), per_split


def workspace(shape, t: torch.Tensor) -> torch.Tensor:
    ws = torch.empty(shape, device=t.device, dtype=torch.float32)
    if POISON_WORKSPACE:
        ws.fill_(float("nan"))
    return ws


# Precise fp32 forms for the epilogues. On sm_90, Triton compiles ``1.0 / tl.sqrt(x)`` to
# sqrt.approx + div.full and ``tl.sigmoid`` to ex2.approx + div.full: non-IEEE results a couple of
# ulps off, where torch divides and takes square roots exactly (its rsqrt and exp are approximate
# too). Emulated in the interpreter at 2 ulps per approximate instruction, the fp32 kernel tests'
# error budgets (2x torch's error + 4 ulps) fail in gate_up_silu and decode_attention because of the
# divisions, and pass with every division and square root exact and only exp2/exp approximate
# (benchmarks/NOTES.md, "Numerics on the GPU"). These cost a few instructions per output element,
# once per epilogue; inner loops keep exp2.


@triton.jit
def rsqrt_rn(x):
    """1 / sqrt(x), each step correctly rounded (div.rn / sqrt.rn on the GPU); any shape."""
    return tl.div_rn(tl.full(x.shape, 1.0, tl.float32), tl.sqrt_rn(x))


@triton.jit
def sigmoid_rn(x):
    """1 / (1 + exp(-x)) with a correctly rounded division (exp stays approximate); any shape.
    The same sums as ``tl.sigmoid`` under the interpreter."""
    return tl.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + tl.exp(-x))


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
    """Sum the split-K partials and apply the epilogue (a second launch: ``SPLITK_MODE = "kernel"``,
    or a consumer that needs the sums). ``out2d`` is [R, NOUT] (any strides); ``ss`` is
    [splits, n_blocks, R] (n-block 0 is read); ``bias2d`` is [G, NOUT] indexed by
    row // rows_per_bias; ``attn`` is [P, R, NOUT]."""
    R, NOUT = out2d.shape
    BR, BN = (16, 64) if interpreted(out2d) else (16, 128)
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


# How a split-K GEMM finishes. "serial": each program stores its fp32 partial tile, and the last
# program to arrive at a tile (an atomic counter per tile) sums the tile's partials in split order
# and applies the epilogue itself, so the GEMM is one launch. "kernel": a second, separate
# reduction kernel does it. The two add the same partials in the same order. "serial" relies on
# the release/acquire pattern of CUTLASS's serial split-K (CTA barrier, then a gpu-scope acq_rel
# atomic); the interpreter runs programs one at a time and cannot exercise it, so the GPU tests
# repeat split GEMMs and require identical results every time.
SPLITK_MODE = "serial"

_COUNTERS: dict = {}  # device -> the int32 counter buffer every split launch on that device uses
# device -> buffers replaced by a larger one. They stay alive: a CUDA graph captured before the
# growth still addresses its buffer, and freeing it would let every later replay write into
# whatever tensor the allocator put there next.
_RETIRED: dict = {}


def serial_split() -> bool:
    return SPLITK_MODE == "serial"


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
                f"addressing the old one). Call cqil_kernels.ops._common.reserve_tile_counters('{t.device}', {tiles}) "
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


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """``acc + a @ b`` in fp32: tensor cores in b's dtype, or fp32 operands under UPCAST (see
    :func:`dot_flags`)."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PREC)
    else:
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PREC)
    return acc


def check_out(out: torch.Tensor | None, shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    dtype = like.dtype if dtype is None else dtype
    if out is None:
        return torch.empty(shape, device=like.device, dtype=dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != like.device:
        raise ValueError(f"out must be {tuple(shape)} {dtype} on {like.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def kernel_out(out: torch.Tensor) -> torch.Tensor:
    """Buffer the kernel stores into. The interpreter converts fp32 -> bf16 by truncation (the GPU
    rounds to nearest), which would double the output rounding error; under the interpreter a bf16
    result is therefore stored as fp32 and rounded by torch in :func:`finish_out`."""
    if out.dtype == torch.bfloat16 and interpreted(out):
        return workspace(out.shape, out)
    return out


def finish_out(out: torch.Tensor, kout: torch.Tensor) -> torch.Tensor:
    if kout is not out:
        out.copy_(kout)
    return out


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, unchanged for fp32/fp64 (so an fp64 reference stays fp64)."""
    return torch.promote_types(dtype, torch.float32)
