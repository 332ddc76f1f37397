"""Decode attention of a whole CQIL group as one attention over P*nh query heads.

Step 4 of the group decomposition. One new token per sequence attends to each layer's own KV cache
(HF layout [B, nkv, S, D], GQA inside each layer). Split-KV (flash-decoding): the grid is
(batch x layer x kv head, KV split); each program runs an online softmax over its slice of the
cache for all query heads that share the kv head, and writes a normalised partial output plus its
log-sum-exp; the last split to finish (an atomic arrival counter per program group, as in the
GEMMs' serial split-K, ``LaunchConfig.splitk_mode``) combines them, so it stays one launch. In "kernel"
mode a second small kernel combines instead. With a single split the kernel writes the output
directly.

The P caches are P separate tensors. When they are equally strided views of one storage at a
constant pointer offset (e.g. slices of one [P, B, nkv, S, D] buffer), the kernel addresses them
through the first cache's pointer plus a layer stride: no copy. Otherwise they are stacked first,
which copies ``P * B * nkv * kv_len * D`` elements of K and of V per call (the whole live cache:
allocate the caches as views of one buffer to avoid it).

For CUDA graphs pass a static ``kv_len`` (e.g. S), let ``kv_mask`` carry which slots are attended
and ``last_pos`` (a device tensor) the last live slot: the split count and chunk size are derived
from ``kv_len`` on the host, and every split reads only its slots up to ``last_pos``, so a decode
step costs the live length, not S.
"""

import torch

from ..launch_config import launch_config_for
from ._buffers import check_out, compute_dtype, finish_out, kernel_out, workspace
from ._splitk import last_to_arrive, serial_split, sm_count, tile_counters
from ._triton import cdiv, interpreted, next_pow2, tl, triton, use_triton

_LOG2E = 1.4426950408889634


def decode_attention_reference(q, k_caches, v_caches, kv_mask, kv_len, scale, last_pos=None):
    """Torch reference and CPU fallback (HF eager attention numerics, per layer).

    Masked slots, and slots after ``last_pos``, get zero weight and their V is zeroed (so stale or
    uninitialised cache contents cannot leak in as NaN); a row with no valid slot returns zeros.
    ``last_pos`` is applied as a mask on the device (no host sync, so graph capture works); the
    reference still reads all ``kv_len`` slots.
    """
    B, HQ, D = q.shape
    P = len(k_caches)
    NH = HQ // P
    cd = compute_dtype(q.dtype)
    if last_pos is not None:
        live = torch.arange(kv_len, device=q.device) <= last_pos.reshape(())
        kv_mask = live.expand(B, kv_len) if kv_mask is None else kv_mask[:, :kv_len].to(torch.bool) & live
    outs = []
    for j in range(P):
        k = k_caches[j][:, :, :kv_len]
        v = v_caches[j][:, :, :kv_len]
        G = NH // k.shape[1]
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
        qj = q[:, j * NH:(j + 1) * NH, None, :]  # [B, NH, 1, D]
        s = torch.matmul(qj, k.transpose(-1, -2)) * scale  # [B, NH, 1, L]
        if kv_mask is not None:
            keep = kv_mask[:, :kv_len].to(torch.bool)
            s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
            v = v.masked_fill(~keep[:, None, :, None], 0)
        p = torch.softmax(s, dim=-1, dtype=cd).nan_to_num(nan=0.0)
        outs.append(torch.matmul(p.to(q.dtype), v).squeeze(2))
    return torch.cat(outs, dim=1)


@triton.jit
def _combine_head(opart_ptr, lse_ptr, out_ptr, row, b, h, NSPLIT, D, stride_ob, stride_oh, stride_od,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[b, h] = sum_s w_s * o_s / sum_s w_s, w_s = exp2(lse_s - max lse): the splits' partial
    # softmaxes rescaled to a common maximum (empty splits have lse = -inf, weight 0)
    rs = tl.arange(0, BLOCK_S)
    rd = tl.arange(0, BLOCK_D)
    s_mask = rs < NSPLIT
    d_mask = rd < D
    lse = tl.load(lse_ptr + row * NSPLIT + rs, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    o = tl.load(opart_ptr + (row * NSPLIT + rs)[:, None] * D + rd[None, :],
                mask=s_mask[:, None] & d_mask[None, :], other=0.0, cache_modifier=".cg")
    den = tl.sum(w, axis=0)
    # an IEEE division, as torch's (sm_90 compiles "/" to the approximate div.full; _precise.rsqrt_rn)
    res = tl.div_rn(tl.sum(o * w[:, None], axis=0), tl.broadcast_to(tl.where(den > 0.0, den, 1.0), (BLOCK_D,)))
    tl.store(out_ptr + b * stride_ob + h * stride_oh + rd * stride_od, res.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _decode_attn_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, last_ptr, out_ptr, opart_ptr, lse_ptr, cnt_ptr,
    kv_len, qk_scale, NKV, NH, GROUP, P, D, CHUNK, NSPLIT,
    stride_qb, stride_qh, stride_qd,
    stride_kl, stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vl, stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_ms,
    stride_ob, stride_oh, stride_od,
    HAS_MASK: tl.constexpr, HAS_LAST: tl.constexpr, DIRECT: tl.constexpr, SERIAL: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    # this split's slots [lo, hi): the grid is sized for kv_len (static under a CUDA graph); the
    # live length, read on the device, bounds the loop, so slots after it are never loaded
    n_live = kv_len
    if HAS_LAST:
        n_live = tl.maximum(tl.minimum(tl.load(last_ptr) + 1, kv_len), 0).to(tl.int32)
    lo = pid_s * CHUNK
    hi = tl.minimum(lo + CHUNK, n_live)
    g = pid % NKV
    bj = pid // NKV
    j = bj % P
    b = bj // P
    # all query heads of layer j that read kv head g (GQA), padded to BLOCK_G rows for tl.dot
    rg = tl.arange(0, BLOCK_G)
    g_mask = rg < GROUP
    heads = j * NH + g * GROUP + rg
    rd = tl.arange(0, BLOCK_D)
    d_mask = rd < D
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + rd[None, :] * stride_qd,
                mask=g_mask[:, None] & (rd < tl.where(lo < hi, D, 0))[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + j.to(tl.int64) * stride_kl + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh
    v_base = v_ptr + j.to(tl.int64) * stride_vl + b.to(tl.int64) * stride_vb + g.to(tl.int64) * stride_vh
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        in_range = offs < hi
        valid = in_range
        if HAS_MASK:
            keep = tl.load(mask_ptr + b.to(tl.int64) * stride_mb + offs * stride_ms, mask=in_range, other=0)
            valid = valid & (keep != 0)
        kt = tl.load(k_base + offs.to(tl.int64)[:, None] * stride_ks + rd[None, :] * stride_kd,
                     mask=in_range[:, None] & d_mask[None, :], other=0.0)
        # V of masked slots is not loaded (zeros): stale cache contents may be NaN/inf and
        # 0 * NaN would poison the accumulator.
        vt = tl.load(v_base + offs.to(tl.int64)[:, None] * stride_vs + rd[None, :] * stride_vd,
                     mask=valid[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        # scores in log2 units (qk_scale = scale * log2(e)) so exp2 can be used (ex2.approx on sm_90,
    # within the fp32 error budget: benchmarks/NOTES.md, "Numerics on the GPU")
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # while a row has seen no valid slot its max is -inf; subtracting 0 instead keeps
        # exp2(-inf - -inf) = NaN out of alpha and p
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision=DOT_PREC)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
        m_i = m_new
    has = l_i > 0.0
    o = tl.div_rn(acc, tl.broadcast_to(tl.where(has, l_i, 1.0)[:, None], (BLOCK_G, BLOCK_D)))
    row_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT:
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + rd[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        # partials: opart [B*HQ, NSPLIT, D] fp32, lse [B*HQ, NSPLIT] (log2 units, -inf if empty)
        rows = (b * (P * NH) + heads).to(tl.int64) * NSPLIT + pid_s
        tl.store(opart_ptr + rows[:, None] * D + rd[None, :], o, mask=row_mask)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + rows, lse, mask=g_mask)
        if SERIAL:
            # the last split of this (batch, layer, kv head) combines its query heads: no second launch
            if last_to_arrive(cnt_ptr + pid, NSPLIT):
                for gi in range(0, GROUP):
                    head = j * NH + g * GROUP + gi
                    _combine_head(opart_ptr, lse_ptr, out_ptr, b.to(tl.int64) * (P * NH) + head, b, head, NSPLIT, D,
                                  stride_ob, stride_oh, stride_od, BLOCK_S, BLOCK_D)


@triton.jit
def _decode_combine_kernel(
    opart_ptr, lse_ptr, out_ptr, HQ, D, NSPLIT,
    stride_ob, stride_oh, stride_od,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * HQ + head
    _combine_head(opart_ptr, lse_ptr, out_ptr, row, row // HQ, row % HQ, NSPLIT, D, stride_ob, stride_oh, stride_od,
                  BLOCK_S, BLOCK_D)


def _check_last_pos(last_pos, q) -> None:
    if last_pos is None:
        return
    if not isinstance(last_pos, torch.Tensor) or last_pos.numel() != 1 or last_pos.dtype not in (torch.int32, torch.int64):
        raise ValueError("last_pos must be an int32/int64 tensor with one element (the last live cache position)")
    if last_pos.device != q.device:
        raise ValueError(f"last_pos is on {last_pos.device}, q on {q.device}: it is read on the device")


def _layer_addressing(caches, kv_len):
    """(base tensor, layer stride in elements, [B, nkv, S, D] strides) for P caches.

    No copy when the caches are equally strided views at a constant pointer offset (including
    P == 1); otherwise a stacked copy of the live prefix (cost: P*B*nkv*kv_len*D elements).
    """
    c0 = caches[0]
    if len(caches) == 1:
        return c0, 0, c0.stride()
    es = c0.element_size()
    uniform = all(
        c.dtype == c0.dtype and c.device == c0.device and c.shape == c0.shape and c.stride() == c0.stride()
        for c in caches
    )
    if uniform:
        delta = caches[1].data_ptr() - c0.data_ptr()
        if delta % es == 0 and all(c.data_ptr() - c0.data_ptr() == i * delta for i, c in enumerate(caches)):
            return c0, delta // es, c0.stride()
    st = torch.stack([c[:, :, :kv_len] for c in caches])
    return st, st.stride(0), st.stride()[1:]


def decode_attention_triton(q, k_caches, v_caches, kv_mask, kv_len, scale, last_pos=None, *, out=None, num_splits=None):
    """Launch the split-KV kernels; ``out`` ([B, P*nh, D], q.dtype) is written in full.
    ``num_splits`` overrides the heuristic (tests cover 1 and several splits). The split count
    comes from ``kv_len``; ``last_pos`` only bounds the work of each split on the device."""
    B, HQ, D = q.shape
    P = len(k_caches)
    if P == 0 or len(v_caches) != P or HQ % P:
        raise ValueError(f"{P} k caches / {len(v_caches)} v caches for {HQ} query heads")
    NH = HQ // P
    Bk, NKV, S, Dk = k_caches[0].shape
    if Bk != B or Dk != D or NH % NKV or not 0 <= kv_len <= S:
        raise ValueError(f"cache {tuple(k_caches[0].shape)} does not fit q {tuple(q.shape)}, kv_len {kv_len}")
    if kv_mask is not None and (kv_mask.shape[0] != B or kv_mask.shape[1] < kv_len):
        raise ValueError(f"kv_mask {tuple(kv_mask.shape)} must be [B, >= kv_len]")
    _check_last_pos(last_pos, q)
    GROUP = NH // NKV
    out = check_out(out, (B, HQ, D), q)
    kout = kernel_out(out)
    interp = interpreted(q)
    cfg = launch_config_for(q.device)
    BLOCK_N = cfg.attention.block_n
    BLOCK_D = max(16, next_pow2(D))
    BLOCK_G = max(16, next_pow2(GROUP))
    n_blocks = max(1, cdiv(kv_len, BLOCK_N))
    programs = B * P * NKV
    if num_splits is None:
        # enough programs for ~2 per SM; never more splits than KV blocks
        num_splits = cfg.attention.num_splits or max(1, min(cdiv(cfg.programs_per_sm * sm_count(q), programs),
                                                             cfg.max_kv_splits))
    num_splits = max(1, min(int(num_splits), n_blocks))
    chunk = cdiv(n_blocks, num_splits) * BLOCK_N
    num_splits = max(1, cdiv(kv_len, chunk))
    k_base, k_layer, ks = _layer_addressing(k_caches, kv_len)
    v_base, v_layer, vs = _layer_addressing(v_caches, kv_len)
    upcast = interp and q.dtype == torch.bfloat16
    direct = num_splits == 1
    if direct:
        opart = lse = kout
    else:
        opart = workspace((B * HQ, num_splits, D), q)
        lse = workspace((B * HQ, num_splits), q)
    mask = kv_mask.view(torch.uint8) if kv_mask is not None else q
    serial = not direct and serial_split(q)
    cnt = tile_counters(q, programs) if serial else kout
    block_s = max(2, next_pow2(num_splits))
    _decode_attn_kernel[(programs, num_splits)](
        q, k_base, v_base, mask, last_pos if last_pos is not None else q, kout, opart, lse, cnt,
        kv_len, float(scale) * _LOG2E, NKV, NH, GROUP, P, D, chunk, num_splits,
        *q.stride(), k_layer, *ks, v_layer, *vs,
        *(mask.stride() if kv_mask is not None else (0, 0)), *kout.stride(),
        HAS_MASK=kv_mask is not None, HAS_LAST=last_pos is not None, DIRECT=direct, SERIAL=serial, UPCAST=upcast,
        DOT_PREC="ieee" if upcast or q.dtype == torch.float32 else "tf32",
        BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_S=block_s,
        num_warps=cfg.attention.num_warps, num_stages=cfg.attention.num_stages,
    )
    if not direct and not serial:
        _decode_combine_kernel[(B * HQ,)](
            opart, lse, kout, HQ, D, num_splits, *kout.stride(),
            BLOCK_S=block_s, BLOCK_D=BLOCK_D, num_warps=4,
        )
    return finish_out(out, kout)


@torch.library.custom_op("cqil::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                         kv_mask: torch.Tensor | None, kv_len: int, scale: float,
                         last_pos: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(q):
        return decode_attention_triton(q, k_caches, v_caches, kv_mask, kv_len, scale, last_pos)
    _check_last_pos(last_pos, q)
    return decode_attention_reference(q, k_caches, v_caches, kv_mask, kv_len, scale, last_pos)


@_decode_attention_op.register_fake
def _(q, k_caches, v_caches, kv_mask, kv_len, scale, last_pos=None):
    return q.new_empty(q.shape)


def decode_attention(q: torch.Tensor, k_caches, v_caches, kv_mask: torch.Tensor | None, kv_len: int,
                     scale: float, last_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Single-token attention of P layers over their own KV caches (split-KV, GQA per layer).

    Args:
        q: [B, P*nh, D], RoPE applied; global head j*nh + h belongs to layer j.
        k_caches, v_caches: sequences of P tensors [B, nkv, S, D] (HF cache layout; S may exceed
            kv_len for static caches). Query head h of layer j reads kv head h // (nh // nkv).
        kv_mask: [B, S] bool (True = attend) or None.
        kv_len: only cache positions < kv_len are read; it sizes the launch (use the static S
            under a CUDA graph).
        scale: softmax scale, usually D ** -0.5.
        last_pos: optional int tensor with one element on q's device: the last live cache
            position (e.g. the decode step's write slot). Positions after it are neither attended
            nor read, so a static ``kv_len`` costs only the live slots, and a captured CUDA graph
            stays valid as the value advances.

    Returns:
        [B, P*nh, D] in q.dtype. A row with no valid position returns zeros.

    Example:
        >>> o = decode_attention(q, [c.keys for c in layers], [c.values for c in layers], None, L, D**-0.5)
    """
    return _decode_attention_op(q, list(k_caches), list(v_caches), kv_mask, int(kv_len), float(scale), last_pos)
