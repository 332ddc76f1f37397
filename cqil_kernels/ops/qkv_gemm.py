"""QKV projection of P layers from one shared input, with each layer's input RMSNorm fused.

Step 1+2 of the group decomposition (docs/design.md section 2): the residual stream ``x`` is
normalised once and multiplied by every layer's q, k and v weights, as one GEMM over their
N-concatenation. Each weight stays the layer's own tensor: the kernel reads "part" g of layer j
(q, k or v; G parts per layer) through a table of offsets (``_tables.weight_table``), and an
N-block never straddles two parts, so one program reads one tensor.

The kernel never materialises the normalised input. RMSNorm is a per-row scale, so
``(x * rstd * g_j) @ W_j.T == rstd * ((x * g_j) @ W_j.T)``: the K loop multiplies the x tile by the
N-block's layer norm weight ``g_j`` (prologue), accumulates ``sum(x^2)`` alongside the dot, and the
epilogue scales by ``rstd``. With split-K the scale is nonlinear in the partial sums, so partial
dots and partial ``sum(x^2)`` go to an fp32 workspace and the reduction applies rstd and bias.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..launch_config import launch_config_for
from ._buffers import check_out, compute_dtype, finish_out, kernel_out, workspace
from ._precise import rsqrt_rn
from ._splitk import last_to_arrive, pick_split_k, serial_split, splitk_reduce, sum_splits, tile_counters
from ._triton import cdiv, dot_acc, dot_flags, tl, triton, use_triton
from ._tables import as_op_list, check_same_layout, from_op_list, weight_table

MAX_PARTS = 3  # q, k, v


def qkv_layout(norm_weights, weights, biases):
    """Check the argument lists; returns (P, G, part sizes [N_0 .. N_{G-1}], N = sum, H)."""
    if not isinstance(weights, (list, tuple)) or not weights:
        raise TypeError("weights must be a non-empty list of [N_g, H] tensors")
    P = len(norm_weights) if norm_weights is not None else 1
    if norm_weights is not None and (P == 0 or len(weights) % P):
        raise ValueError(f"{len(weights)} weights are not a whole number of parts for {P} norm weights")
    G = len(weights) // P
    if not 1 <= G <= MAX_PARTS:
        raise ValueError(f"{G} weights per layer; the kernel takes 1 to {MAX_PARTS} (q, k, v)")
    sizes = [int(w.shape[0]) for w in weights[:G]]
    H = int(weights[0].shape[1])
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != H or w.shape[0] != sizes[i % G] or w.stride() != weights[0].stride():
            raise ValueError(f"weights[{i}] is {tuple(w.shape)} stride {w.stride()}: every layer must have the "
                             f"part sizes {sizes} x H = {H} of layer 0, with one stride")
    if biases is not None:
        if len(biases) != len(weights):
            raise ValueError(f"{len(biases)} biases for {len(weights)} weights")
        for i, b in enumerate(biases):
            if tuple(b.shape) != (sizes[i % G],):
                raise ValueError(f"biases[{i}] is {tuple(b.shape)}, expected ({sizes[i % G]},)")
    if norm_weights is not None:
        check_same_layout(list(norm_weights), "norm_weights")
        if tuple(norm_weights[0].shape) != (H,):
            raise ValueError(f"norm weights must be [H] = ({H},), got {tuple(norm_weights[0].shape)}")
    return P, G, sizes, sum(sizes), H


def qkv_gemm_reference(x, norm_weights, weights, biases, eps):
    """Torch reference and CPU fallback; RMSNorm numerics of HF's LlamaRMSNorm, one F.linear per
    weight as the original modules compute it."""
    P, G, _, _, _ = qkv_layout(norm_weights, weights, biases)
    if norm_weights is None:
        xs = [x] * P
    else:
        xc = x.to(compute_dtype(x.dtype))
        r = (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        xs = [nw * r for nw in norm_weights]
    outs = [F.linear(xs[i // G], w, None if biases is None else biases[i]) for i, w in enumerate(weights)]
    return torch.cat(outs, dim=-1)


@triton.jit
def _qkv_epilogue(acc, ss, b_ptr, b_off, out_ptr, rm, rn, cols, mask, n_mask, inv_k, eps, stride_om, stride_on,
                  HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_NORM:
        acc = acc * rsqrt_rn(ss * inv_k + eps)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + b_off + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def part_of_block(pid_n, NBL, NB0, NB1, N0, N1, N2, G):
    """N-block ``pid_n`` -> (layer, part index layer*G + g, first local row, rows of the part,
    the part's first column inside its layer). Blocks are layer-major, then part-major; each
    part is padded to whole blocks."""
    layer = pid_n // NBL
    b = pid_n - layer * NBL
    g = (b >= NB0).to(tl.int32) + (b >= NB0 + NB1).to(tl.int32)
    row0 = (b - tl.where(g == 0, 0, tl.where(g == 1, NB0, NB0 + NB1)))
    n_g = tl.where(g == 0, N0, tl.where(g == 1, N1, N2))
    start = tl.where(g == 0, 0, tl.where(g == 1, N0, N0 + N1))
    return layer, layer * G + g, row0, n_g, start


@triton.jit
def _qkv_gemm_kernel(
    x_ptr, nw_ptr, nw_off_ptr, w_ptr, w_off_ptr, b_ptr, b_off_ptr, out_ptr, ws_ptr, ss_ptr, cnt_ptr,
    M, K, N, NBL, NB0, NB1, N0, N1, N2, G, K_PER_SPLIT, PN, SPLITS, inv_k, eps,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_om, stride_on,
    HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SERIAL: tl.constexpr,
    ALIGNED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    # one program, one part (q, k or v) of one layer: one weight tensor, one norm weight
    layer, part, blk, n_g, start = part_of_block(pid_n, NBL, NB0, NB1, N0, N1, N2, G)
    rn = blk * BN + tl.arange(0, BN)
    n_mask = rn < n_g
    cols = layer * N + start + rn
    w_off = tl.load(w_off_ptr + part)
    if ALIGNED:
        w_off = tl.multiple_of(w_off, 8)
    rm = pid_m * BM + tl.arange(0, BM)
    m_mask = rm < M
    rk0 = tl.arange(0, BK)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + w_off + rn.to(tl.int64)[None, :] * stride_wn
    if HAS_NORM:
        nw_base = nw_ptr + tl.load(nw_off_ptr + layer)
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
            g = tl.load(nw_base + rk, mask=k_mask, other=0.0)
            xt = xf * g.to(tl.float32)[None, :]
        acc = dot_acc(xt, wt, acc, UPCAST, DOT_PREC)
    mask = m_mask[:, None] & n_mask[None, :]
    b_off = 0
    if HAS_BIAS:
        b_off = tl.load(b_off_ptr + part)
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
                _qkv_epilogue(acc, ss, b_ptr, b_off, out_ptr, rm, rn, cols, mask, n_mask, inv_k, eps,
                              stride_om, stride_on, HAS_NORM, HAS_BIAS)
    else:
        _qkv_epilogue(acc, ss, b_ptr, b_off, out_ptr, rm, rn, cols, mask, n_mask, inv_k, eps,
                      stride_om, stride_on, HAS_NORM, HAS_BIAS)


def qkv_gemm_launch(x, norm_weights, weights, biases, eps, dest, split_k=None, serial=False):
    """Launch the GEMM kernel only. Returns ``(splits, ws, ss)``.

    With one split, or with ``serial`` (the last program of each tile finishes it, see
    ``LaunchConfig.splitk_mode``), the kernel writes the finished result (rstd and bias applied) into
    ``dest`` ([M, P*N], any float dtype). Otherwise ``ws`` holds the fp32 partial dots
    [splits, M, P*N] and ``ss`` the partial sums of squares [splits, n_blocks, M] (None without a
    norm; every n-block holds the same sums), and the caller's epilogue (``splitk_reduce``, or a
    consumer kernel such as ``qkv_rope_cache``) must sum them and apply rstd and bias.
    """
    P, G, sizes, N, K = qkv_layout(norm_weights, weights, biases)
    M = x.shape[0]
    if x.shape[1] != K:
        raise ValueError(f"x {tuple(x.shape)} does not match weights of H = {K}")
    PN = P * N
    cfg = launch_config_for(x.device)
    tile = cfg.gemm_tile("qkv_gemm", M, N, K, P)
    BM, BN, BK = tile.BM, tile.BN, tile.BK
    nbs = [cdiv(n, BN) for n in sizes] + [0] * (MAX_PARTS - G)
    n3 = sizes + [0] * (MAX_PARTS - G)
    nbl = sum(nbs)
    mb = cdiv(M, BM)
    splits, per_split = pick_split_k(mb * nbl * P, cdiv(K, BK), x, tile.split_k if split_k is None else split_k, cfg)
    upcast, prec = dot_flags(weights[0].dtype, x)  # also readies the interpreter on CPU
    has_norm = norm_weights is not None
    if splits > 1:
        ws = workspace((splits, M, PN), x)
        ss = workspace((splits, nbl * P, M), x) if has_norm else None
    else:
        ws = ss = None
    wt = weight_table(weights)
    nwt = weight_table(norm_weights) if has_norm else None
    bt = weight_table(biases) if biases is not None else None
    serial = serial and splits > 1
    cnt = tile_counters(x, mb * nbl * P) if serial else dest
    _qkv_gemm_kernel[(mb, nbl * P, splits)](
        x, nwt.base if has_norm else x, nwt.offsets if has_norm else wt.offsets, wt.base, wt.offsets,
        bt.base if bt is not None else x, bt.offsets if bt is not None else wt.offsets,
        dest, ws if ws is not None else dest, ss if ss is not None else dest, cnt,
        M, K, N, nbl, nbs[0], nbs[1], n3[0], n3[1], n3[2], G, per_split * BK, PN, splits, 1.0 / K, float(eps),
        *x.stride(), *weights[0].stride(), *dest.stride(),
        HAS_NORM=has_norm, HAS_BIAS=biases is not None, SPLIT=splits > 1, SERIAL=serial, ALIGNED=wt.aligned,
        UPCAST=upcast, DOT_PREC=prec, BM=BM, BN=BN, BK=BK,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return splits, ws, ss


def qkv_gemm_triton(x, norm_weights, weights, biases, eps, *, out=None, split_k=None):
    """Launch the Triton kernel(s). ``out`` (optional, [M, P*N] in x.dtype) is written in full;
    ``split_k`` overrides the heuristic (tests use it to cover both paths)."""
    P, _, _, N, K = qkv_layout(norm_weights, weights, biases)
    M = x.shape[0]
    PN = P * N
    out = check_out(out, (M, PN), x)
    kout = kernel_out(out)
    serial = serial_split(x)
    splits, ws, ss = qkv_gemm_launch(x, norm_weights, weights, biases, eps, kout, split_k, serial)
    if splits > 1 and not serial:
        # the separate-reduction mode adds the bias from one concatenated row (a tiny copy; the
        # default serial mode reads every part's own bias)
        bias_row = None if biases is None else torch.cat(list(biases)).view(1, PN)
        splitk_reduce(ws, kout, splits=splits, ss=ss, inv_k=1.0 / K, eps=float(eps), bias2d=bias_row,
                      rows_per_bias=max(M, 1))
    return finish_out(out, kout)


@torch.library.custom_op("cqil::qkv_gemm", mutates_args=())
def _qkv_gemm_op(x: torch.Tensor, norm_weights: list[torch.Tensor], weights: list[torch.Tensor],
                 biases: list[torch.Tensor], eps: float) -> torch.Tensor:
    norm_weights, biases = from_op_list(norm_weights), from_op_list(biases)
    if use_triton(x) and not launch_config_for(x.device).gemm_to_torch(x.device, x.shape[0]):
        return qkv_gemm_triton(x, norm_weights, weights, biases, eps)
    return qkv_gemm_reference(x, norm_weights, weights, biases, eps)


@_qkv_gemm_op.register_fake
def _(x, norm_weights, weights, biases, eps):
    P, _, _, N, _ = qkv_layout(from_op_list(norm_weights), weights, from_op_list(biases))
    return x.new_empty((x.shape[0], P * N))


def qkv_gemm(x: torch.Tensor, norm_weights: Sequence[torch.Tensor] | None, weights: Sequence[torch.Tensor],
             biases: Sequence[torch.Tensor] | None, eps: float) -> torch.Tensor:
    """Fused per-layer RMSNorm + QKV projection of P layers sharing one input.

    Args:
        x: [M, H] residual stream (fp32/fp16/bf16).
        norm_weights: P tensors [H], each layer's input-RMSNorm weight; or None (no norm: every
            weight is applied to x itself, P = 1).
        weights: P*G tensors [N_g, H], layer-major: layer j's parts (e.g. q, k, v: G = 3) are
            ``weights[j*G : (j+1)*G]``; every layer has the same part sizes N_0..N_{G-1} (G <= 3).
            nn.Linear [out, in] layout; each may be its own tensor (read through an offset table).
        biases: one [N_g] tensor per weight, or None.
        eps: RMSNorm epsilon.

    Returns:
        [M, P*N] in x.dtype (N = sum_g N_g): layer j's columns ``[jN, (j+1)N)`` hold
        ``(rmsnorm(x) * norm_weights[j]) @ [W_j0 | W_j1 | ...].T + b``.

    Example:
        >>> ws = [w for l in group for w in (l.self_attn.q_proj.weight, l.self_attn.k_proj.weight,
        ...                                  l.self_attn.v_proj.weight)]
        >>> out = qkv_gemm(h, [l.input_layernorm.weight for l in group], ws, None, 1e-6)
    """
    return _qkv_gemm_op(x, as_op_list(norm_weights), list(weights), as_op_list(biases), eps)
