"""Per-layer post-attention RMSNorm + gate/up projection + SiLU(gate) * up, for P layers at once.

Step 6 of the group decomposition. Each layer j has its own MLP input ``u[j]`` (``h + a_j``), so
the norm is per (layer, row). Given the residual ``h``, the kernel forms that input itself from the
attention outputs (``h + a_j`` plus the bypass ``a_{j-1} .. a_{j-d}``) while loading each K tile,
so the [P, M, H] input is never written and no elementwise kernel runs before this one. Like :mod:`.qkv_gemm`, the norm weight multiplies the input tile in
the prologue, ``sum(u^2)`` is accumulated in the same K loop, and rstd scales both accumulators in
the epilogue, where SiLU(gate) * up is applied before the single store: the [P, M, 2I]
intermediate never reaches memory.
"""

import torch
import torch.nn.functional as F

from ._common import (
    cdiv, check_out, compute_dtype, dot_flags, finish_out, gemm_blocks, kernel_out, dot_acc, last_to_arrive,
    pick_split_k, serial_split, splitk_reduce, sum_splits, tile_counters, tl, triton,
    use_triton, workspace,
)


def mlp_inputs_reference(residual, attn, bypass):
    """[M, H] residual and [P, M, H] attention outputs -> [P, M, H] MLP inputs
    ``residual + attn[j] + attn[j-1] + ... + attn[j-d]`` with HF's rounding (one add at a time)."""
    u = residual.unsqueeze(0) + attn
    for i in range(1, bypass + 1):
        u = torch.cat([u[:i], u[i:] + attn[:-i]], dim=0)
    return u


def gate_up_silu_reference(u, norm_weight, weight, eps, residual=None, bypass=0):
    """Torch reference and CPU fallback (HF LlamaRMSNorm + LlamaMLP numerics, per layer)."""
    if residual is not None:
        u = mlp_inputs_reference(residual, u, bypass)
    if norm_weight is not None:
        uc = u.to(compute_dtype(u.dtype))
        r = (uc * torch.rsqrt(uc.pow(2).mean(-1, keepdim=True) + eps)).to(u.dtype)
        xn = norm_weight[:, None, :] * r
    else:
        xn = u
    I = weight.shape[1] // 2
    gu = torch.bmm(xn, weight.transpose(1, 2))
    return F.silu(gu[..., :I]) * gu[..., I:]


@triton.jit
def _gate_up_epilogue(acc_g, acc_u, ss, out_ptr, p64, rm, rn, mask, inv_k, eps,
                      stride_op, stride_om, stride_on, HAS_NORM: tl.constexpr):
    if HAS_NORM:
        rstd = (1.0 / tl.sqrt(ss * inv_k + eps))[:, None]
        acc_g = acc_g * rstd
        acc_u = acc_u * rstd
    res = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(out_ptr + p64 * stride_op + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on,
             res.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_up_kernel(
    u_ptr, res_ptr, nw_ptr, w_ptr, out_ptr, ws_ptr, ss_ptr, cnt_ptr,
    M, I, K, SPLITS, K_PER_SPLIT, WS_STRIDE, BYPASS, inv_k, eps,
    stride_up, stride_um, stride_uk, stride_rm, stride_rk, stride_nwp, stride_nwk, stride_wp, stride_wn, stride_wk,
    stride_op, stride_om, stride_on,
    HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
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
    u_rows = u_ptr + p64 * stride_up + rm.to(tl.int64)[:, None] * stride_um
    res_rows = res_ptr + rm.to(tl.int64)[:, None] * stride_rm
    # with a residual, u holds attention outputs: layer p's input adds a[p], a[p-1], .., a[p-n_add+1]
    n_add = tl.minimum(BYPASS, p) + 1
    # gate rows [0, I), up rows [I, 2I) of layer p's stacked weight
    wg_cols = w_ptr + p64 * stride_wp + rn.to(tl.int64)[None, :] * stride_wn
    wu_cols = wg_cols + I * stride_wn
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
            xt = xt.to(tl.float32) + tl.load(res_rows + rk[None, :] * stride_rk, mask=x_mask, other=0.0).to(tl.float32)
            for i in range(1, n_add):
                xt += tl.load(u_rows - i * stride_up + rk[None, :] * stride_uk, mask=x_mask, other=0.0).to(tl.float32)
        w_mask = k_mask[:, None] & n_mask[None, :]
        wg = tl.load(wg_cols + rk[:, None] * stride_wk, mask=w_mask, other=0.0)
        wu = tl.load(wu_cols + rk[:, None] * stride_wk, mask=w_mask, other=0.0)
        if HAS_NORM:
            xf = xt.to(tl.float32)
            ss += tl.sum(xf * xf, axis=1)
            g = tl.load(nw_ptr + p * stride_nwp + rk * stride_nwk, mask=k_mask, other=0.0)
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


def _check_mlp_inputs(u, residual, bypass):
    P, M, K = u.shape
    if residual is not None and residual.shape != (M, K):
        raise ValueError(f"residual must be [M, H] = {(M, K)}, got {tuple(residual.shape)}")
    if not 0 <= bypass < max(P, 1) or (bypass and residual is None):
        raise ValueError(f"bypass must be in [0, P-1] = [0, {P - 1}] and needs a residual, got {bypass}")


def gate_up_silu_triton(u, norm_weight, weight, eps, residual=None, bypass=0, *, out=None, split_k=None):
    """Launch the Triton kernel; ``out`` ([P, M, I], u.dtype, contiguous) is written in full."""
    P, M, K = u.shape
    if weight.shape[0] != P or weight.shape[2] != K or weight.shape[1] % 2:
        raise ValueError(f"weight {tuple(weight.shape)} does not match u {tuple(u.shape)}")
    _check_mlp_inputs(u, residual, bypass)
    I = weight.shape[1] // 2
    out = check_out(out, (P, M, I), u)
    kout = kernel_out(out)
    cfg = gemm_blocks(M, u)
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    # two fp32 accumulators: halve the N tile of the large-M config to stay clear of spills
    BN = min(BN, 64)
    mb, nb = cdiv(M, BM), cdiv(I, BN)
    splits, per_split = pick_split_k(mb * nb * P, cdiv(K, BK), u, split_k)
    upcast, prec = dot_flags(weight.dtype, u)
    has_norm = norm_weight is not None
    if splits > 1:
        ws = workspace((splits, P * M, 2 * I), u)
        ss = workspace((splits, nb, P * M), u) if has_norm else ws
    else:
        ws = ss = kout
    nw = norm_weight if has_norm else weight
    has_res = residual is not None
    serial = splits > 1 and serial_split()
    cnt = tile_counters(u, mb * nb * P) if serial else ws
    _gate_up_kernel[(mb, nb, P * splits)](
        u, residual if has_res else u, nw, weight, kout, ws, ss, cnt,
        M, I, K, splits, per_split * BK, P * M * 2 * I, int(bypass), 1.0 / K, float(eps),
        *u.stride(), *(residual.stride() if has_res else (0, 0)), *(nw.stride() if has_norm else (0, 0)),
        *weight.stride(), *kout.stride(),
        HAS_NORM=has_norm, HAS_RES=has_res, SPLIT=splits > 1, SERIAL=serial, UPCAST=upcast, DOT_PREC=prec,
        BM=BM, BN=BN, BK=BK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1 and not serial:
        if not kout.is_contiguous():
            raise ValueError("out must be contiguous")
        splitk_reduce(ws, kout.view(P * M, I), splits=splits, ss=ss if has_norm else None,
                      inv_k=1.0 / K, eps=float(eps), glu=True)
    return finish_out(out, kout)


@torch.library.custom_op("cqil::gate_up_silu", mutates_args=())
def _gate_up_silu_op(u: torch.Tensor, norm_weight: torch.Tensor | None, weight: torch.Tensor,
                     eps: float, residual: torch.Tensor | None = None, bypass: int = 0) -> torch.Tensor:
    if use_triton(u):
        return gate_up_silu_triton(u, norm_weight, weight, eps, residual, bypass)
    _check_mlp_inputs(u, residual, bypass)
    return gate_up_silu_reference(u, norm_weight, weight, eps, residual, bypass)


@_gate_up_silu_op.register_fake
def _(u, norm_weight, weight, eps, residual=None, bypass=0):
    return u.new_empty((u.shape[0], u.shape[1], weight.shape[1] // 2))


def gate_up_silu(u: torch.Tensor, norm_weight: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, residual: torch.Tensor | None = None, bypass: int = 0) -> torch.Tensor:
    """Fused post-attention RMSNorm + gate/up projection + SiLU(gate) * up for P layers.

    Args:
        u: [P, M, H], layer j's MLP input (before its post-attention norm) in u[j]; or, when
            ``residual`` is given, the attention outputs a_j of the P layers.
        norm_weight: [P, H] post-attention RMSNorm weights, or None (no norm).
        weight: [P, 2*I, H]; rows [0, I) of weight[j] are layer j's gate_proj, rows [I, 2I) its
            up_proj.
        eps: RMSNorm epsilon.
        residual: [M, H] group input h, or None. Then layer j's MLP input is
            ``h + a_j + a_{j-1} + ... + a_{j-d}`` (d = min(bypass, j)), formed in the prologue.
        bypass: CQIL bypass distance d in [0, P-1] (only with ``residual``).

    Returns:
        [P, M, I] in u.dtype: ``silu(xn_j @ Wg_j.T) * (xn_j @ Wu_j.T)``, xn_j the normalised input.

    Example:
        >>> m = gate_up_silu(a, post_norm_w, w_gate_up, 1e-6, residual=h, bypass=1)  # [P, M, I]
    """
    return _gate_up_silu_op(u, norm_weight, weight, eps, residual, bypass)
