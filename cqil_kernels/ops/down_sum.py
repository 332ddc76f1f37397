"""Down-projection of P layers as ONE GEMM over the K-concatenation, with the residual fused.

Step 7 of the group decomposition: ``h_next = h + sum_j a_j + sum_j m_j @ Wd_j.T``. Seen as one
GEMM, ``[m_0 | m_1 | ... ] @ [Wd_0 | Wd_1 | ...].T`` has K = P*I, and its K reduction *is* the
sum over layers. The kernel walks K as (layer p, then k inside the layer) and indexes the stacked
[P, H, I] weight and [P, M, I] activations directly, so nothing is concatenated or copied, and a
K tile never straddles two layers (each layer's I is padded to whole tiles by masking). The
residual and the attention outputs are added in the epilogue (or in the split-K reduction).
"""

import torch

from ._common import (
    cdiv, check_out, dot_flags, finish_out, gemm_blocks, kernel_out, dot_acc, last_to_arrive, pick_split_k,
    serial_split, splitk_reduce, sum_splits, tile_counters, tl, triton, use_triton, workspace,
)


def down_sum_reference(m, weight, residual, attn=None):
    """Torch reference and CPU fallback: per-layer down_proj in the working precision (as HF
    computes each layer), then ``residual + sum_j attn[j] + sum_j down_j`` in that precision."""
    y = torch.bmm(m, weight.transpose(1, 2))  # [P, M, H]
    out = residual.clone()
    for j in range(m.shape[0]):
        if attn is not None:
            out = out + attn[j]
        out = out + y[j]
    return out.to(residual.dtype)


@triton.jit
def _down_sum_epilogue(acc, res_ptr, attn_ptr, out_ptr, rm64, rn, mask, P,
                       stride_rm, stride_rn, stride_ap, stride_am, stride_an, stride_om, stride_on,
                       HAS_ATTN: tl.constexpr):
    acc += tl.load(res_ptr + rm64[:, None] * stride_rm + rn[None, :] * stride_rn,
                   mask=mask, other=0.0).to(tl.float32)
    if HAS_ATTN:
        for j in range(0, P):
            acc += tl.load(attn_ptr + j * stride_ap + rm64[:, None] * stride_am + rn[None, :] * stride_an,
                           mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm64[:, None] * stride_om + rn[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _down_sum_kernel(
    m_ptr, w_ptr, res_ptr, attn_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, I, P, KB_PER_LAYER, KB_PER_SPLIT, SPLITS,
    stride_mp, stride_mm, stride_mk, stride_wp, stride_wn, stride_wk,
    stride_rm, stride_rn, stride_ap, stride_am, stride_an, stride_om, stride_on,
    HAS_ATTN: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_mask = rm < M
    n_mask = rn < N
    rk0 = tl.arange(0, BK)
    m_rows = m_ptr + rm.to(tl.int64)[:, None] * stride_mm
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    kb_lo = pid_k * KB_PER_SPLIT
    total_kb = P * KB_PER_LAYER
    for t in range(0, KB_PER_SPLIT):
        # virtual K block -> (layer, K block inside the layer); blocks past the end are masked
        kb = kb_lo + t
        p = kb // KB_PER_LAYER
        rk = (kb - p * KB_PER_LAYER) * BK + rk0
        k_mask = (rk < I) & (kb < total_kb)
        p64 = p.to(tl.int64)
        xt = tl.load(m_rows + p64 * stride_mp + rk[None, :] * stride_mk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_cols + p64 * stride_wp + rk[:, None] * stride_wk,
                     mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = dot_acc(xt, wt, acc, UPCAST, DOT_PREC)
    mask = m_mask[:, None] & n_mask[None, :]
    rm64 = rm.to(tl.int64)
    if SPLIT:
        # workspace [SPLITS, M, N]
        tile_ws = ws_ptr + rm64[:, None] * N + rn[None, :]
        split_stride = M * N
        tl.store(tile_ws + pid_k.to(tl.int64) * split_stride, acc, mask=mask)
        if SERIAL:
            if last_to_arrive(cnt_ptr + pid_m * tl.num_programs(1) + pid_n, SPLITS):
                acc = sum_splits(tile_ws, split_stride, SPLITS, mask)
                _down_sum_epilogue(acc, res_ptr, attn_ptr, out_ptr, rm64, rn, mask, P, stride_rm, stride_rn,
                                   stride_ap, stride_am, stride_an, stride_om, stride_on, HAS_ATTN)
    else:
        _down_sum_epilogue(acc, res_ptr, attn_ptr, out_ptr, rm64, rn, mask, P, stride_rm, stride_rn,
                           stride_ap, stride_am, stride_an, stride_om, stride_on, HAS_ATTN)


def down_sum_triton(m, weight, residual, attn=None, *, out=None, split_k=None):
    """Launch the Triton kernel; ``out`` ([M, H], residual.dtype) is written in full."""
    P, M, I = m.shape
    H = weight.shape[1]
    if weight.shape[0] != P or weight.shape[2] != I or tuple(residual.shape) != (M, H):
        raise ValueError(f"shapes do not match: m {tuple(m.shape)}, weight {tuple(weight.shape)}, "
                         f"residual {tuple(residual.shape)}")
    if attn is not None and tuple(attn.shape) != (P, M, H):
        raise ValueError(f"attn must be {(P, M, H)}, got {tuple(attn.shape)}")
    out = check_out(out, (M, H), residual)
    kout = kernel_out(out)
    cfg = gemm_blocks(M, m)
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    mb, nb = cdiv(M, BM), cdiv(H, BN)
    kb_layer = cdiv(I, BK)
    splits, per_split = pick_split_k(mb * nb, P * kb_layer, m, split_k)
    upcast, prec = dot_flags(weight.dtype, m)
    ws = workspace((splits, M, H), m) if splits > 1 else kout
    a = attn if attn is not None else residual
    serial = splits > 1 and serial_split()
    cnt = tile_counters(m, mb * nb) if serial else ws
    _down_sum_kernel[(mb, nb, splits)](
        m, weight, residual, a, kout, ws, cnt,
        M, H, I, P, kb_layer, per_split, splits,
        *m.stride(), *weight.stride(), *residual.stride(),
        *(attn.stride() if attn is not None else (0, 0, 0)), *kout.stride(),
        HAS_ATTN=attn is not None, SPLIT=splits > 1, SERIAL=serial, UPCAST=upcast, DOT_PREC=prec,
        BM=BM, BN=BN, BK=BK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1 and not serial:
        splitk_reduce(ws, kout, splits=splits, residual=residual, attn=attn)
    return finish_out(out, kout)


@torch.library.custom_op("cqil::down_sum", mutates_args=())
def _down_sum_op(m: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                 attn: torch.Tensor | None) -> torch.Tensor:
    if use_triton(m):
        return down_sum_triton(m, weight, residual, attn)
    return down_sum_reference(m, weight, residual, attn)


@_down_sum_op.register_fake
def _(m, weight, residual, attn):
    return residual.new_empty(residual.shape)


def down_sum(m: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
             attn: torch.Tensor | None = None) -> torch.Tensor:
    """Down-projection of P layers summed into the residual stream, as one GEMM over K = P*I.

    Args:
        m: [P, M, I], layer j's SiLU(gate)*up activations in m[j].
        weight: [P, H, I], weight[j] = layer j's down_proj.weight.
        residual: [M, H], the group's shared input h.
        attn: [P, M, H] each layer's attention output a_j (o_proj result), or None.

    Returns:
        [M, H] in residual.dtype: ``residual + sum_j attn[j] + sum_j m[j] @ weight[j].T``.

    Example:
        >>> h_next = down_sum(gate_up_silu(u, g2, w_gu, eps), w_down, h, a)
    """
    return _down_sum_op(m, weight, residual, attn)
