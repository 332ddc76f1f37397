"""Down-projection of P layers as ONE GEMM over the K-concatenation, with the residual fused.

Step 7 of the group decomposition: ``h_next = h + sum_j a_j + sum_j m_j @ Wd_j.T``. Seen as one
GEMM, ``[m_0 | m_1 | ... ] @ [Wd_0 | Wd_1 | ...].T`` has K = P*I, and its K reduction *is* the
sum over layers. The kernel walks K as (layer p, then k inside the layer), finds layer p's own
[H, I] weight through an offset table (``_tables``) and indexes the [P, M, I] activations directly,
so nothing is concatenated or copied, and a K tile never straddles two layers (each layer's I is
padded to whole tiles by masking). The residual and the attention outputs are added in the
epilogue (or in the split-K reduction). Without a residual the result is the group's delta only
(a rank holding part of a group adds the residual on one rank only).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..launch_config import launch_config_for
from ._buffers import check_out, finish_out, kernel_out, workspace
from ._splitk import last_to_arrive, pick_split_k, serial_split, splitk_reduce, sum_splits, tile_counters
from ._triton import cdiv, dot_acc, dot_flags, tl, triton, use_triton
from ._tables import check_same_layout, weight_table


def _check(m, weights, residual, attn):
    if m.dim() != 3:
        raise ValueError(f"m must be [P, M, I], got {tuple(m.shape)}")
    P, M, I = m.shape
    if not isinstance(weights, (list, tuple)) or len(weights) != P:
        raise ValueError(f"need one [H, I] weight per layer (P = {P})")
    check_same_layout(list(weights), "weights")
    if weights[0].dim() != 2 or weights[0].shape[1] != I:
        raise ValueError(f"weights must be [H, I = {I}], got {tuple(weights[0].shape)}")
    H = weights[0].shape[0]
    if residual is not None and tuple(residual.shape) != (M, H):
        raise ValueError(f"residual must be [M, H] = {(M, H)}, got {tuple(residual.shape)}")
    if attn is not None and tuple(attn.shape) != (P, M, H):
        raise ValueError(f"attn must be {(P, M, H)}, got {tuple(attn.shape)}")
    return P, M, I, H


def down_sum_reference(m, weights, residual, attn=None):
    """Torch reference and CPU fallback: per-layer down_proj in the working precision (as HF
    computes each layer), then ``residual + sum_j attn[j] + sum_j down_j`` in that precision
    (the same sum starting from zero without a residual)."""
    P, M, _, H = _check(m, weights, residual, attn)
    out = residual.clone() if residual is not None else m.new_zeros((M, H))
    for j, w in enumerate(weights):
        if attn is not None:
            out = out + attn[j]
        out = out + F.linear(m[j], w)
    return out


@triton.jit
def _down_sum_epilogue(acc, res_ptr, attn_ptr, out_ptr, rm64, rn, mask, P,
                       stride_rm, stride_rn, stride_ap, stride_am, stride_an, stride_om, stride_on,
                       HAS_RES: tl.constexpr, HAS_ATTN: tl.constexpr):
    if HAS_RES:
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
    m_ptr, w_ptr, w_off_ptr, res_ptr, attn_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, I, P, KB_PER_LAYER, KB_PER_SPLIT, SPLITS,
    stride_mp, stride_mm, stride_mk, stride_wn, stride_wk,
    stride_rm, stride_rn, stride_ap, stride_am, stride_an, stride_om, stride_on,
    HAS_RES: tl.constexpr, HAS_ATTN: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr,
    ALIGNED: tl.constexpr, UPCAST: tl.constexpr,
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
        # a scalar condition folded into the bound, not and-ed as a mask (Triton 3.9's interpreter
        # keeps a scalar comparison int32, which its loads refuse as a mask)
        k_mask = rk < tl.where(kb < total_kb, I, 0)
        p64 = p.to(tl.int64)
        # layer p's own weight (a past-the-end block reads the last layer's entry, fully masked)
        w_off = tl.load(w_off_ptr + tl.minimum(p, P - 1))
        if ALIGNED:
            w_off = tl.multiple_of(w_off, 8)
        xt = tl.load(m_rows + p64 * stride_mp + rk[None, :] * stride_mk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_cols + w_off + rk[:, None] * stride_wk,
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
                                   stride_ap, stride_am, stride_an, stride_om, stride_on, HAS_RES, HAS_ATTN)
    else:
        _down_sum_epilogue(acc, res_ptr, attn_ptr, out_ptr, rm64, rn, mask, P, stride_rm, stride_rn,
                           stride_ap, stride_am, stride_an, stride_om, stride_on, HAS_RES, HAS_ATTN)


def down_sum_triton(m, weights, residual, attn=None, *, out=None, split_k=None):
    """Launch the Triton kernel; ``out`` ([M, H], in m's dtype (residual's if given)) is written in full."""
    P, M, I, H = _check(m, weights, residual, attn)
    like = residual if residual is not None else m
    out = check_out(out, (M, H), like)
    kout = kernel_out(out)
    cfg = launch_config_for(m.device)
    tile = cfg.gemm_tile("down_sum", M, H, I, P)
    BM, BN, BK = tile.BM, tile.BN, tile.BK
    mb, nb = cdiv(M, BM), cdiv(H, BN)
    kb_layer = cdiv(I, BK)
    splits, per_split = pick_split_k(mb * nb, P * kb_layer, m, tile.split_k if split_k is None else split_k, cfg)
    upcast, prec = dot_flags(weights[0].dtype, m)
    ws = workspace((splits, M, H), m) if splits > 1 else kout
    wt = weight_table(weights)
    has_res = residual is not None
    r = residual if has_res else kout
    a = attn if attn is not None else r
    serial = splits > 1 and serial_split(m)
    cnt = tile_counters(m, mb * nb) if serial else ws
    _down_sum_kernel[(mb, nb, splits)](
        m, wt.base, wt.offsets, r, a, kout, ws, cnt,
        M, H, I, P, kb_layer, per_split, splits,
        *m.stride(), *weights[0].stride(), *(r.stride() if has_res else (0, 0)),
        *(attn.stride() if attn is not None else (0, 0, 0)), *kout.stride(),
        HAS_RES=has_res, HAS_ATTN=attn is not None, SPLIT=splits > 1, SERIAL=serial, ALIGNED=wt.aligned,
        UPCAST=upcast, DOT_PREC=prec, BM=BM, BN=BN, BK=BK, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    if splits > 1 and not serial:
        splitk_reduce(ws, kout, splits=splits, residual=residual, attn=attn)
    return finish_out(out, kout)


@torch.library.custom_op("cqil::down_sum", mutates_args=())
def _down_sum_op(m: torch.Tensor, weights: list[torch.Tensor], residual: torch.Tensor | None,
                 attn: torch.Tensor | None) -> torch.Tensor:
    if use_triton(m) and not launch_config_for(m.device).gemm_to_torch(m.device, m.shape[1]):
        return down_sum_triton(m, weights, residual, attn)
    return down_sum_reference(m, weights, residual, attn)


@_down_sum_op.register_fake
def _(m, weights, residual, attn):
    like = residual if residual is not None else m
    return like.new_empty((m.shape[1], weights[0].shape[0]))


def down_sum(m: torch.Tensor, weights: Sequence[torch.Tensor], residual: torch.Tensor | None,
             attn: torch.Tensor | None = None) -> torch.Tensor:
    """Down-projection of P layers summed into the residual stream, as one GEMM over K = P*I.

    Args:
        m: [P, M, I], layer j's SiLU(gate)*up activations in m[j].
        weights: P tensors [H, I], layer j's down_proj.weight (one layout; each its own tensor).
        residual: [M, H], the group's shared input h; or None (the result is the delta only).
        attn: [P, M, H] each layer's attention output a_j (o_proj result), or None.

    Returns:
        [M, H] (residual's dtype, else m's): ``residual + sum_j attn[j] + sum_j m[j] @ weights[j].T``.

    Example:
        >>> h_next = down_sum(gate_up_silu(a, g2, gates, ups, eps, h), downs, h, a)
    """
    return _down_sum_op(m, list(weights), residual, attn)
