"""Per-layer post-attention RMSNorm + gate/up projection + SiLU(gate) * up, for P layers at once.

Step 6 of the group decomposition. Each layer j has its own MLP input ``u[j]`` (``h + a_j``), so
the norm is per (layer, row). Given the residual ``h``, the kernel forms that input itself from the
attention outputs (``h + a_j`` plus the bypass ``a_{j-1} .. a_{j-d}``) while loading each K tile,
so the [P, M, H] input is never written and no elementwise kernel runs before this one. Like
:mod:`.qkv_gemm`, the norm weight multiplies the input tile in the prologue, ``sum(u^2)`` is
accumulated in the same K loop, and rstd scales both accumulators in the epilogue, where
SiLU(gate) * up is applied before the single store: the [P, M, 2I] intermediate never reaches
memory. Each layer's gate, up and norm weights are its own tensors, read through offset tables.

The bypass distance is a compile-time constant and its terms are a static loop with masked loads,
so the K loop stays the innermost loop and Triton software-pipelines it (asynchronous copies) for
every bypass; a runtime-bounded loop inside it would not be pipelined.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..launch_config import launch_config_for
from ._buffers import check_out, compute_dtype, finish_out, kernel_out, workspace
from ._precise import rsqrt_rn, sigmoid_rn
from ._splitk import last_to_arrive, pick_split_k, serial_split, splitk_reduce, sum_splits, tile_counters
from ._triton import cdiv, dot_acc, dot_flags, tl, triton, use_triton
from ._tables import as_op_list, check_same_layout, from_op_list, weight_table


def mlp_inputs_reference(residual, attn, bypass, context=0):
    """[M, H] residual and [C + P, M, H] attention outputs -> [P, M, H] MLP inputs
    ``residual + attn[i] + attn[i-1] + ... + attn[i-d]`` for i = C .. C+P-1 (the first C entries
    are earlier layers' outputs, bypass terms only), with HF's rounding (one add at a time)."""
    u = residual.unsqueeze(0) + attn
    for i in range(1, bypass + 1):
        u = torch.cat([u[:i], u[i:] + attn[:-i]], dim=0)
    return u[context:]


def _check(u, norm_weights, gate_weights, up_weights, residual, bypass, context):
    if u.dim() != 3:
        raise ValueError(f"u must be [P, M, H], got {tuple(u.shape)}")
    Pu, M, K = u.shape
    if not 0 <= context < max(Pu, 1) or (context and residual is None):
        raise ValueError(f"context must be in [0, {Pu - 1}] and needs a residual, got {context}")
    P = Pu - context
    for name, ws in (("gate_weights", gate_weights), ("up_weights", up_weights)):
        if not isinstance(ws, (list, tuple)) or len(ws) != P:
            raise ValueError(f"{name}: need one [I, H] weight per layer (P = {P})")
    check_same_layout(list(gate_weights) + list(up_weights), "gate/up weights")
    if gate_weights[0].dim() != 2 or gate_weights[0].shape[1] != K:
        raise ValueError(f"gate/up weights must be [I, H = {K}], got {tuple(gate_weights[0].shape)}")
    if norm_weights is not None:
        if len(norm_weights) != P:
            raise ValueError(f"norm_weights: need one [H] weight per layer (P = {P}), got {len(norm_weights)}")
        check_same_layout(list(norm_weights), "norm_weights")
        if tuple(norm_weights[0].shape) != (K,):
            raise ValueError(f"norm weights must be [H] = ({K},), got {tuple(norm_weights[0].shape)}")
    if residual is not None and residual.shape != (M, K):
        raise ValueError(f"residual must be [M, H] = {(M, K)}, got {tuple(residual.shape)}")
    if not 0 <= bypass < max(Pu, 1) or (bypass and residual is None):
        raise ValueError(f"bypass must be in [0, {Pu - 1}] and needs a residual, got {bypass}")
    return P, M, K, gate_weights[0].shape[0]


def gate_up_silu_reference(u, norm_weights, gate_weights, up_weights, eps, residual=None, bypass=0, context=0):
    """Torch reference and CPU fallback (HF LlamaRMSNorm + LlamaMLP numerics, per layer)."""
    _check(u, norm_weights, gate_weights, up_weights, residual, bypass, context)
    if residual is not None:
        u = mlp_inputs_reference(residual, u, bypass, context)
    outs = []
    for j in range(u.shape[0]):
        x = u[j]
        if norm_weights is not None:
            xc = x.to(compute_dtype(x.dtype))
            x = norm_weights[j] * (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        outs.append(F.silu(F.linear(x, gate_weights[j])) * F.linear(x, up_weights[j]))
    return torch.stack(outs)


@triton.jit
def _gate_up_epilogue(acc_g, acc_u, ss, out_ptr, p64, rm, rn, mask, inv_k, eps,
                      stride_op, stride_om, stride_on, HAS_NORM: tl.constexpr):
    if HAS_NORM:
        rstd = rsqrt_rn(ss * inv_k + eps)[:, None]
        acc_g = acc_g * rstd
        acc_u = acc_u * rstd
    res = acc_g * sigmoid_rn(acc_g) * acc_u
    tl.store(out_ptr + p64 * stride_op + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on,
             res.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_up_kernel(
    u_ptr, res_ptr, nw_ptr, nw_off_ptr, w_ptr, w_off_ptr, out_ptr, ws_ptr, ss_ptr, cnt_ptr,
    M, I, K, P, SPLITS, K_PER_SPLIT, WS_STRIDE, CONTEXT, inv_k, eps,
    stride_up, stride_um, stride_uk, stride_rm, stride_rk, stride_wn, stride_wk,
    stride_op, stride_om, stride_on,
    BYPASS: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr, SPLIT: tl.constexpr,
    SERIAL: tl.constexpr, ALIGNED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_pk = tl.program_id(2)
    p = pid_pk // SPLITS
    pid_k = pid_pk % SPLITS
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_mask = rm < M
    n_mask = rn < I
    rk0 = tl.arange(0, BK)
    p64 = p.to(tl.int64)
    e = CONTEXT + p  # this layer's entry in u (the first CONTEXT entries are bypass terms only)
    u_rows = u_ptr + e.to(tl.int64) * stride_up + rm.to(tl.int64)[:, None] * stride_um
    res_rows = res_ptr + rm.to(tl.int64)[:, None] * stride_rm
    # layer p's gate and up weights (table entries p and P + p), each its own tensor
    g_off = tl.load(w_off_ptr + p)
    u_off = tl.load(w_off_ptr + P + p)
    if ALIGNED:
        g_off = tl.multiple_of(g_off, 8)
        u_off = tl.multiple_of(u_off, 8)
    wg_cols = w_ptr + g_off + rn.to(tl.int64)[None, :] * stride_wn
    wu_cols = w_ptr + u_off + rn.to(tl.int64)[None, :] * stride_wn
    if HAS_NORM:
        nw_base = nw_ptr + tl.load(nw_off_ptr + p)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    ss = tl.zeros((BM,), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    for kk in range(0, K_PER_SPLIT, BK):
        rk = k_lo + kk + rk0
        k_mask = rk < K
        x_mask = m_mask[:, None] & k_mask[None, :]
        xt = tl.load(u_rows + rk[None, :] * stride_uk, mask=x_mask, other=0.0)
        if HAS_RES:
            # with a residual, u holds attention outputs: layer p's input adds u[e], u[e-1], ..,
            # u[e-d] with d = min(BYPASS, e); a term before entry 0 is masked off
            xt = xt.to(tl.float32) + tl.load(res_rows + rk[None, :] * stride_rk, mask=x_mask, other=0.0).to(tl.float32)
            for i in tl.static_range(1, BYPASS + 1):
                # the entry exists iff e >= i: folded into the K bound (see down_sum)
                t_mask = m_mask[:, None] & (rk < tl.where(e >= i, K, 0))[None, :]
                xt += tl.load(u_rows - i * stride_up + rk[None, :] * stride_uk, mask=t_mask,
                              other=0.0).to(tl.float32)
        w_mask = k_mask[:, None] & n_mask[None, :]
        wg = tl.load(wg_cols + rk[:, None] * stride_wk, mask=w_mask, other=0.0)
        wu = tl.load(wu_cols + rk[:, None] * stride_wk, mask=w_mask, other=0.0)
        if HAS_NORM:
            xf = xt.to(tl.float32)
            ss += tl.sum(xf * xf, axis=1)
            g = tl.load(nw_base + rk, mask=k_mask, other=0.0)
            xt = xf * g.to(tl.float32)[None, :]
        acc_g = dot_acc(xt, wg, acc_g, UPCAST, DOT_PREC)
        acc_u = dot_acc(xt, wu, acc_u, UPCAST, DOT_PREC)
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        # workspace [SPLITS, P*M, 2I]: gate partials in columns [0, I), up partials in [I, 2I);
        # partial sums of squares [SPLITS, n-blocks, P*M] (every N-block writes its own copy, so
        # a tile's last program finds all of its splits' copies)
        tile_ws = ws_ptr + (p64 * M + rm)[:, None] * (2 * I) + rn[None, :]
        tl.store(tile_ws + pid_k.to(tl.int64) * WS_STRIDE, acc_g, mask=mask)
        tl.store(tile_ws + pid_k.to(tl.int64) * WS_STRIDE + I, acc_u, mask=mask)
        R = WS_STRIDE // (2 * I)
        SS_STRIDE = tl.num_programs(1) * R
        tile_ss = ss_ptr + pid_n * R + p64 * M + rm
        if HAS_NORM:
            tl.store(tile_ss + pid_k.to(tl.int64) * SS_STRIDE, ss, mask=m_mask)
        if SERIAL:
            tile = (p * tl.num_programs(0) + pid_m) * tl.num_programs(1) + pid_n
            if last_to_arrive(cnt_ptr + tile, SPLITS):
                acc_g = sum_splits(tile_ws, WS_STRIDE, SPLITS, mask)
                acc_u = sum_splits(tile_ws + I, WS_STRIDE, SPLITS, mask)
                if HAS_NORM:
                    ss = sum_splits(tile_ss, SS_STRIDE, SPLITS, m_mask)
                _gate_up_epilogue(acc_g, acc_u, ss, out_ptr, p64, rm, rn, mask, inv_k, eps,
                                  stride_op, stride_om, stride_on, HAS_NORM)
    else:
        _gate_up_epilogue(acc_g, acc_u, ss, out_ptr, p64, rm, rn, mask, inv_k, eps,
                          stride_op, stride_om, stride_on, HAS_NORM)


def gate_up_silu_triton(u, norm_weights, gate_weights, up_weights, eps, residual=None, bypass=0, context=0, *,
                        out=None, split_k=None):
    """Launch the Triton kernel; ``out`` ([P, M, I], u.dtype, contiguous) is written in full."""
    P, M, K, I = _check(u, norm_weights, gate_weights, up_weights, residual, bypass, context)
    out = check_out(out, (P, M, I), u)
    kout = kernel_out(out)
    # two fp32 accumulators and two weight tiles: the heuristic table gives this op its own, smaller
    # tiles (ptxas at Llama-7B shapes, sm_90: decode BK = 128 needs 255 registers and spills with a
    # bypass term; BK = 64 needs 128-142, no spills, 61-74 KB shared memory)
    cfg = launch_config_for(u.device)
    tile = cfg.gemm_tile("gate_up_silu", M, I, K, P)
    BM, BN, BK = tile.BM, tile.BN, tile.BK
    mb, nb = cdiv(M, BM), cdiv(I, BN)
    splits, per_split = pick_split_k(mb * nb * P, cdiv(K, BK), u, tile.split_k if split_k is None else split_k, cfg)
    upcast, prec = dot_flags(gate_weights[0].dtype, u)
    has_norm = norm_weights is not None
    if splits > 1:
        ws = workspace((splits, P * M, 2 * I), u)
        ss = workspace((splits, nb, P * M), u) if has_norm else ws
    else:
        ws = ss = kout
    wt = weight_table(list(gate_weights) + list(up_weights))
    nwt = weight_table(norm_weights) if has_norm else None
    has_res = residual is not None
    serial = splits > 1 and serial_split(u)
    cnt = tile_counters(u, mb * nb * P) if serial else ws
    _gate_up_kernel[(mb, nb, P * splits)](
        u, residual if has_res else u, nwt.base if has_norm else u, nwt.offsets if has_norm else wt.offsets,
        wt.base, wt.offsets, kout, ws, ss, cnt,
        M, I, K, P, splits, per_split * BK, P * M * 2 * I, int(context), 1.0 / K, float(eps),
        *u.stride(), *(residual.stride() if has_res else (0, 0)), *gate_weights[0].stride(), *kout.stride(),
        BYPASS=int(bypass), HAS_NORM=has_norm, HAS_RES=has_res, SPLIT=splits > 1, SERIAL=serial,
        ALIGNED=wt.aligned, UPCAST=upcast, DOT_PREC=prec,
        BM=BM, BN=BN, BK=BK, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    if splits > 1 and not serial:
        if not kout.is_contiguous():
            raise ValueError("out must be contiguous")
        splitk_reduce(ws, kout.view(P * M, I), splits=splits, ss=ss if has_norm else None,
                      inv_k=1.0 / K, eps=float(eps), glu=True)
    return finish_out(out, kout)


@torch.library.custom_op("cqil::gate_up_silu", mutates_args=())
def _gate_up_silu_op(u: torch.Tensor, norm_weights: list[torch.Tensor], gate_weights: list[torch.Tensor],
                     up_weights: list[torch.Tensor], eps: float, residual: torch.Tensor | None = None,
                     bypass: int = 0, context: int = 0) -> torch.Tensor:
    norm_weights = from_op_list(norm_weights)
    if use_triton(u) and not launch_config_for(u.device).gemm_to_torch(u.device, u.shape[1]):
        return gate_up_silu_triton(u, norm_weights, gate_weights, up_weights, eps, residual, bypass, context)
    return gate_up_silu_reference(u, norm_weights, gate_weights, up_weights, eps, residual, bypass, context)


@_gate_up_silu_op.register_fake
def _(u, norm_weights, gate_weights, up_weights, eps, residual=None, bypass=0, context=0):
    return u.new_empty((u.shape[0] - context, u.shape[1], gate_weights[0].shape[0]))


def gate_up_silu(u: torch.Tensor, norm_weights: Sequence[torch.Tensor] | None, gate_weights: Sequence[torch.Tensor],
                 up_weights: Sequence[torch.Tensor], eps: float, residual: torch.Tensor | None = None,
                 bypass: int = 0, context: int = 0) -> torch.Tensor:
    """Fused post-attention RMSNorm + gate/up projection + SiLU(gate) * up for P layers.

    Args:
        u: [C + P, M, H]. Without ``residual``: layer j's MLP input (before its post-attention
            norm) in u[j] (C = 0). With ``residual``: the attention outputs a of the layers, of
            which the first C = ``context`` belong to earlier layers of the group computed
            elsewhere (bypass terms only) and the last P to the layers computed here.
        norm_weights: P tensors [H], the post-attention RMSNorm weights, or None (no norm).
        gate_weights, up_weights: P tensors [I, H] each (gate_proj / up_proj weights), one layout.
        eps: RMSNorm epsilon.
        residual: [M, H] group input h, or None. Then layer j's MLP input (entry e = C + j) is
            ``h + a_e + a_{e-1} + ... + a_{e-d}`` (d = min(bypass, e)), formed in the prologue.
        bypass: CQIL bypass distance d in [0, C + P - 1] (only with ``residual``).
        context: C, see ``u``.

    Returns:
        [P, M, I] in u.dtype: ``silu(xn_j @ Wg_j.T) * (xn_j @ Wu_j.T)``, xn_j the normalised input.

    Example:
        >>> m = gate_up_silu(a, post_norms, gates, ups, 1e-6, residual=h, bypass=1)  # [P, M, I]
    """
    return _gate_up_silu_op(u, as_op_list(norm_weights), list(gate_weights),
                            list(up_weights), eps, residual, int(bypass), int(context))
