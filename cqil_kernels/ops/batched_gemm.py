"""Batched GEMM over the P layers of a group: each layer's input times its own weight.

Step 5 of the group decomposition (o_proj): ``out[j] = x[j] @ W[j].T (+ b[j])``. One launch for
all P layers, each layer's weight its own tensor (read through an offset table, see ``_tables``);
for decode (M <= 16) the K reduction is split so the few output tiles still spread over all SMs
(the weights dominate the bytes, so the whole GPU has to stream them).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..launch_config import launch_config_for
from ._buffers import check_out, finish_out, kernel_out, workspace
from ._splitk import last_to_arrive, pick_split_k, serial_split, splitk_reduce, sum_splits, tile_counters
from ._triton import cdiv, dot_acc, dot_flags, tl, triton, use_triton
from ._tables import as_op_list, check_same_layout, from_op_list, weight_table


def _check(x, weights, biases):
    if x.dim() != 3:
        raise ValueError(f"x must be [P, M, K], got {tuple(x.shape)}")
    P, M, K = x.shape
    if not isinstance(weights, (list, tuple)) or len(weights) != P:
        raise ValueError(f"need one weight per layer: P = {P}, got {len(weights) if isinstance(weights, (list, tuple)) else weights!r}")
    check_same_layout(list(weights), "weights")
    if weights[0].dim() != 2 or weights[0].shape[1] != K:
        raise ValueError(f"weights must be [N, K = {K}] each, got {tuple(weights[0].shape)}")
    N = weights[0].shape[0]
    if biases is not None:
        if len(biases) != P:
            raise ValueError(f"need one bias per layer: P = {P}, got {len(biases)}")
        check_same_layout(list(biases), "biases")
        if tuple(biases[0].shape) != (N,):
            raise ValueError(f"biases must be [N] = ({N},), got {tuple(biases[0].shape)}")
    return P, M, K, N


def batched_gemm_reference(x, weights, biases=None):
    """Torch reference and CPU fallback: each layer's own F.linear (cuBLAS on the GPU)."""
    P, M, _, N = _check(x, weights, biases)
    out = x.new_empty((P, M, N))
    for j, w in enumerate(weights):
        out[j] = F.linear(x[j], w, None if biases is None else biases[j])
    return out


@triton.jit
def _batched_epilogue(acc, b_ptr, b_off_ptr, out_ptr, p, p64, rm, rn, mask, n_mask,
                      stride_op, stride_om, stride_on, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + tl.load(b_off_ptr + p) + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + p64 * stride_op + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _batched_gemm_kernel(
    x_ptr, w_ptr, w_off_ptr, b_ptr, b_off_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, SPLITS, K_PER_SPLIT, WS_STRIDE,
    stride_xp, stride_xm, stride_xk, stride_wn, stride_wk,
    stride_op, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr, ALIGNED: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_pk = tl.program_id(2)
    p = pid_pk // SPLITS
    pid_k = pid_pk % SPLITS
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_mask = rm < M
    n_mask = rn < N
    rk0 = tl.arange(0, BK)
    p64 = p.to(tl.int64)
    x_rows = x_ptr + p64 * stride_xp + rm.to(tl.int64)[:, None] * stride_xm
    w_off = tl.load(w_off_ptr + p)  # layer p's weight: its own tensor, found through the table
    if ALIGNED:
        w_off = tl.multiple_of(w_off, 8)
    w_cols = w_ptr + w_off + rn.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    for kk in range(0, K_PER_SPLIT, BK):
        rk = k_lo + kk + rk0
        k_mask = rk < K
        xt = tl.load(x_rows + rk[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_cols + rk[:, None] * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = dot_acc(xt, wt, acc, UPCAST, DOT_PREC)
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        # workspace [SPLITS, P*M, N]: row p*M + m
        tile_ws = ws_ptr + (p64 * M + rm)[:, None] * N + rn[None, :]
        tl.store(tile_ws + pid_k.to(tl.int64) * WS_STRIDE, acc, mask=mask)
        if SERIAL:
            tile = (p * tl.num_programs(0) + pid_m) * tl.num_programs(1) + pid_n
            if last_to_arrive(cnt_ptr + tile, SPLITS):
                acc = sum_splits(tile_ws, WS_STRIDE, SPLITS, mask)
                _batched_epilogue(acc, b_ptr, b_off_ptr, out_ptr, p, p64, rm, rn, mask, n_mask,
                                  stride_op, stride_om, stride_on, HAS_BIAS)
    else:
        _batched_epilogue(acc, b_ptr, b_off_ptr, out_ptr, p, p64, rm, rn, mask, n_mask,
                          stride_op, stride_om, stride_on, HAS_BIAS)


def batched_gemm_triton(x, weights, biases=None, *, out=None, split_k=None):
    """Launch the Triton kernel; ``out`` ([P, M, N], x.dtype, contiguous) is written in full."""
    P, M, K, N = _check(x, weights, biases)
    out = check_out(out, (P, M, N), x)
    kout = kernel_out(out)
    cfg = launch_config_for(x.device)
    tile = cfg.gemm_tile("batched_gemm", M, N, K, P)
    BM, BN, BK = tile.BM, tile.BN, tile.BK
    mb, nb = cdiv(M, BM), cdiv(N, BN)
    splits, per_split = pick_split_k(mb * nb * P, cdiv(K, BK), x, tile.split_k if split_k is None else split_k, cfg)
    upcast, prec = dot_flags(weights[0].dtype, x)
    ws = workspace((splits, P * M, N), x) if splits > 1 else kout
    wt = weight_table(weights)
    bt = weight_table(biases) if biases is not None else None
    serial = splits > 1 and serial_split(x)
    cnt = tile_counters(x, mb * nb * P) if serial else ws
    _batched_gemm_kernel[(mb, nb, P * splits)](
        x, wt.base, wt.offsets, bt.base if bt is not None else x, bt.offsets if bt is not None else wt.offsets,
        kout, ws, cnt,
        M, N, K, splits, per_split * BK, P * M * N,
        *x.stride(), *weights[0].stride(), *kout.stride(),
        HAS_BIAS=biases is not None, SPLIT=splits > 1, SERIAL=serial, ALIGNED=wt.aligned, UPCAST=upcast,
        DOT_PREC=prec, BM=BM, BN=BN, BK=BK, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    if splits > 1 and not serial:
        if not kout.is_contiguous():
            raise ValueError("out must be contiguous")
        bias2d = None if biases is None else torch.stack(list(biases))  # separate-reduction mode only
        splitk_reduce(ws, kout.view(P * M, N), splits=splits, bias2d=bias2d, rows_per_bias=max(M, 1))
    return finish_out(out, kout)


@torch.library.custom_op("cqil::batched_gemm", mutates_args=())
def _batched_gemm_op(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    biases = from_op_list(biases)
    if use_triton(x) and not launch_config_for(x.device).gemm_to_torch(x.device, x.shape[1]):
        return batched_gemm_triton(x, weights, biases)
    return batched_gemm_reference(x, weights, biases)


@_batched_gemm_op.register_fake
def _(x, weights, biases):
    return x.new_empty((x.shape[0], x.shape[1], weights[0].shape[0]))


def batched_gemm(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Per-layer linear over a group: ``out[j] = x[j] @ weights[j].T + biases[j]``.

    Args:
        x: [P, M, K], layer j's input in x[j] (any strides).
        weights: P tensors [N, K] (nn.Linear [out, in] layout), one layout; each its own tensor.
        biases: P tensors [N], or None.

    Returns:
        [P, M, N] in x.dtype.

    Example:
        >>> a = batched_gemm(attn_out.view(P, M, nh * D), [l.self_attn.o_proj.weight for l in group])
    """
    return _batched_gemm_op(x, list(weights), as_op_list(biases))
