"""QKV projection of P layers from one shared input, with each layer's input RMSNorm fused.

Step 1+2 of the group decomposition (docs/design.md section 2): the residual stream ``x`` is
normalised once and multiplied by the N-concatenation of the P layers' q/k/v weights.

The kernel never materialises the normalised input. RMSNorm is a per-row scale, so
``(x * rstd * g_j) @ W_j.T == rstd * ((x * g_j) @ W_j.T)``: the K loop multiplies the x tile by the
N-block's layer norm weight ``g_j`` (prologue), accumulates ``sum(x^2)`` alongside the dot, and the
epilogue scales by ``rstd``. With split-K the scale is nonlinear in the partial sums, so partial
dots and partial ``sum(x^2)`` go to an fp32 workspace and the reduction applies rstd and bias.
"""

import torch
import torch.nn.functional as F

from ._common import (
    cdiv, check_out, compute_dtype, dot_flags, finish_out, gemm_blocks, kernel_out, dot_acc, last_to_arrive, pick_split_k,
    serial_split, splitk_reduce, sum_splits, tile_counters, tl, triton, use_triton, workspace,
)


def qkv_gemm_reference(x, norm_weight, weight, bias, eps):
    """Torch reference and CPU fallback; RMSNorm numerics of HF's LlamaRMSNorm."""
    if norm_weight is None:
        return F.linear(x, weight, bias)
    P = norm_weight.shape[0]
    N = weight.shape[0] // P
    xc = x.to(compute_dtype(x.dtype))
    r = (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    outs = []
    for j in range(P):
        b = None if bias is None else bias[j * N:(j + 1) * N]
        outs.append(F.linear(norm_weight[j] * r, weight[j * N:(j + 1) * N], b))
    return torch.cat(outs, dim=-1)


@triton.jit
def _qkv_epilogue(acc, ss, b_ptr, out_ptr, rm, cols, mask, n_mask, inv_k, eps, stride_b, stride_om, stride_on,
                  HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_NORM:
        acc = acc * (1.0 / tl.sqrt(ss * inv_k + eps))[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * stride_b, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_gemm_kernel(
    x_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, ws_ptr, ss_ptr, cnt_ptr,
    M, N, K, NB_PER_LAYER, K_PER_SPLIT, PN, SPLITS, inv_k, eps,
    stride_xm, stride_xk, stride_nwp, stride_nwk, stride_wn, stride_wk, stride_b,
    stride_om, stride_on,
    HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    # N-blocks never straddle two layers (each layer's N is padded to whole blocks), so one
    # program needs exactly one layer's norm weight: a [BK] vector per K step.
    layer = pid_n // NB_PER_LAYER
    rn = (pid_n % NB_PER_LAYER) * BN + tl.arange(0, BN)
    n_mask = rn < N
    cols = layer * N + rn
    rm = pid_m * BM + tl.arange(0, BM)
    m_mask = rm < M
    rk0 = tl.arange(0, BK)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ss = tl.zeros((BM,), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    # Constant trip count (K_PER_SPLIT is a multiple of BK); the last split masks past K.
    for kk in range(0, K_PER_SPLIT, BK):
        rk = k_lo + kk + rk0
        k_mask = rk < K
        xt = tl.load(x_rows + rk[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_cols + rk[:, None] * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if HAS_NORM:
            xf = xt.to(tl.float32)
            ss += tl.sum(xf * xf, axis=1)
            g = tl.load(nw_ptr + layer * stride_nwp + rk * stride_nwk, mask=k_mask, other=0.0)
            xt = xf * g.to(tl.float32)[None, :]
        acc = dot_acc(xt, wt, acc, UPCAST, DOT_PREC)
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        # workspace [SPLITS, M, PN]; partial sums of squares [SPLITS, n-blocks, M] (every N-block
        # computed the same sum; each writes its own copy, so a tile's last program finds them all)
        split_stride = M * PN
        tile_ws = ws_ptr + rm.to(tl.int64)[:, None] * PN + cols[None, :]
        tl.store(tile_ws + pid_k.to(tl.int64) * split_stride, acc, mask=mask)
        ss_stride = tl.num_programs(1) * M
        tile_ss = ss_ptr + pid_n * M + rm
        if HAS_NORM:
            tl.store(tile_ss + pid_k * ss_stride, ss, mask=m_mask)
        if SERIAL:
            if last_to_arrive(cnt_ptr + pid_m * tl.num_programs(1) + pid_n, SPLITS):
                acc = sum_splits(tile_ws, split_stride, SPLITS, mask)
                if HAS_NORM:
                    ss = sum_splits(tile_ss, ss_stride, SPLITS, m_mask)
                _qkv_epilogue(acc, ss, b_ptr, out_ptr, rm, cols, mask, n_mask, inv_k, eps, stride_b,
                              stride_om, stride_on, HAS_NORM, HAS_BIAS)
    else:
        _qkv_epilogue(acc, ss, b_ptr, out_ptr, rm, cols, mask, n_mask, inv_k, eps, stride_b,
                      stride_om, stride_on, HAS_NORM, HAS_BIAS)


def qkv_gemm_launch(x, norm_weight, weight, bias, eps, dest, split_k=None, serial=False):
    """Launch the GEMM kernel only. Returns ``(splits, ws, ss)``.

    With one split, or with ``serial`` (the last program of each tile finishes it, see
    ``_common.SPLITK_MODE``), the kernel writes the finished result (rstd and bias applied) into
    ``dest`` ([M, P*N], any float dtype). Otherwise ``ws`` holds the fp32 partial dots
    [splits, M, P*N] and ``ss`` the partial sums of squares [splits, n_blocks, M] (None without a
    norm; every n-block holds the same sums), and the caller's epilogue (``splitk_reduce``, or a
    consumer kernel such as ``qkv_rope_cache``) must sum them and apply rstd and bias.
    """
    M, K = x.shape
    PN = weight.shape[0]
    P = norm_weight.shape[0] if norm_weight is not None else 1
    if weight.shape[1] != K or PN % P:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)} and P={P}")
    N = PN // P
    cfg = gemm_blocks(M, x)  # also readies the interpreter on CPU
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    nb = cdiv(N, BN)
    mb = cdiv(M, BM)
    splits, per_split = pick_split_k(mb * nb * P, cdiv(K, BK), x, split_k)
    upcast, prec = dot_flags(weight.dtype, x)
    has_norm = norm_weight is not None
    if splits > 1:
        ws = workspace((splits, M, PN), x)
        ss = workspace((splits, nb * P, M), x) if has_norm else None
    else:
        ws = ss = None
    nw = norm_weight if has_norm else weight
    b = bias if bias is not None else weight
    serial = serial and splits > 1
    cnt = tile_counters(x, mb * nb * P) if serial else dest
    _qkv_gemm_kernel[(mb, nb * P, splits)](
        x, nw, weight, b, dest, ws if ws is not None else dest, ss if ss is not None else dest, cnt,
        M, N, K, nb, per_split * BK, PN, splits, 1.0 / K, float(eps),
        *x.stride(), *(nw.stride() if has_norm else (0, 0)), *weight.stride(),
        b.stride(0) if bias is not None else 0, *dest.stride(),
        HAS_NORM=has_norm, HAS_BIAS=bias is not None, SPLIT=splits > 1, SERIAL=serial,
        UPCAST=upcast, DOT_PREC=prec, BM=BM, BN=BN, BK=BK,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return splits, ws, ss


def qkv_gemm_triton(x, norm_weight, weight, bias, eps, *, out=None, split_k=None):
    """Launch the Triton kernel(s). ``out`` (optional, [M, P*N] in x.dtype) is written in full;
    ``split_k`` overrides the heuristic (tests use it to cover both paths)."""
    M, K = x.shape
    PN = weight.shape[0]
    out = check_out(out, (M, PN), x)
    kout = kernel_out(out)
    serial = serial_split()
    splits, ws, ss = qkv_gemm_launch(x, norm_weight, weight, bias, eps, kout, split_k, serial)
    if splits > 1 and not serial:
        splitk_reduce(ws, kout, splits=splits, ss=ss, inv_k=1.0 / K,
                      eps=float(eps), bias2d=None if bias is None else bias.view(1, PN),
                      rows_per_bias=max(M, 1))
    return finish_out(out, kout)


@torch.library.custom_op("cqil::qkv_gemm", mutates_args=())
def _qkv_gemm_op(x: torch.Tensor, norm_weight: torch.Tensor | None, weight: torch.Tensor,
                 bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    if use_triton(x):
        return qkv_gemm_triton(x, norm_weight, weight, bias, eps)
    return qkv_gemm_reference(x, norm_weight, weight, bias, eps)


@_qkv_gemm_op.register_fake
def _(x, norm_weight, weight, bias, eps):
    return x.new_empty((x.shape[0], weight.shape[0]))


def qkv_gemm(x: torch.Tensor, norm_weight: torch.Tensor | None, weight: torch.Tensor,
             bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Fused per-layer RMSNorm + QKV projection of P layers sharing one input.

    Args:
        x: [M, H] residual stream (fp32/fp16/bf16).
        norm_weight: [P, H] input-RMSNorm weight of each layer, or None (no norm; P taken as 1).
        weight: [P*N, H]; rows j*N:(j+1)*N are layer j's concatenated q, k, v weights
            (nn.Linear [out, in] layout).
        bias: [P*N] or None.
        eps: RMSNorm epsilon.

    Returns:
        [M, P*N] in x.dtype: ``out[:, jN:(j+1)N] = (rmsnorm(x) * norm_weight[j]) @ W_j.T + b_j``.

    Example:
        >>> out = qkv_gemm(h, torch.stack([l.input_layernorm.weight for l in group]), w_qkv, None, 1e-6)
    """
    return _qkv_gemm_op(x, norm_weight, weight, bias, eps)
