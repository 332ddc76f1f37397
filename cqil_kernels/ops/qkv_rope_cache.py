"""QKV projection + RoPE + KV-cache write of a whole group, in two launches (decode fast path).

Steps 1-3 of the group decomposition for one step of a static-cache decoder: the fused
RMSNorm + QKV GEMM of the P layers (``qkv_gemm``'s kernel), then one small kernel that finishes
the GEMM's split-K reduction (rstd, bias) and, per head, applies the optional per-head q/k RMSNorm
(Qwen3), rotates q and k (RoPE, ``rotate_half`` convention), writes k and v into each layer's cache
slot and q into the attention's [M, P*nh, D] input.

Done with torch ops this is ~20 small kernels per group (reduction, three head-layout copies, two
RoPE expressions of five ops each, two cache writes per layer); inside a CUDA graph each costs
~1-2 us, which is most of a small model's decode step.

Cache layout: one [L, B, nkv, S, D] buffer per K and V (any strides); the group's layers are
``layer0 .. layer0+P-1``. Row ``m`` of ``x`` is token ``m % T`` of sequence ``m // T`` and goes to
slot ``slot[0] + m % T``; ``slot`` is a device tensor so a captured graph stays valid as it moves.
"""

from collections.abc import Sequence

import torch

from ._buffers import compute_dtype, workspace
from ._precise import rsqrt_rn
from ._splitk import sum_splits
from ._triton import interpreted, next_pow2, tl, triton, use_triton
from ._tables import as_op_list, check_same_layout, from_op_list, weight_table
from .qkv_gemm import qkv_gemm_launch, qkv_gemm_reference, qkv_layout


def _rotate_half(t):
    h = t.shape[-1] // 2
    return torch.cat((-t[..., h:], t[..., :h]), dim=-1)


def _rms_norm(t, weight, eps):
    """HF RMSNorm numerics: normalise in fp32, round, then scale by the weight."""
    tf = t.to(compute_dtype(t.dtype))
    return weight * (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps)).to(t.dtype)


def _check_args(x, norm_weights, weights, biases, cos, sin, q_norms, k_norms, k_cache, v_cache, layer0, slot,
                tokens_per_seq, num_heads):
    M = x.shape[0]
    if k_cache.dim() != 5 or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches must be [L, B, nkv, S, D] of one shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    L, Bc, nkv, S, D = k_cache.shape
    P, G, sizes, _, _ = qkv_layout(norm_weights, weights, biases)
    if G != 3 or num_heads < 1 or D % 2 or sizes != [num_heads * D, nkv * D, nkv * D]:
        raise ValueError(f"weights must be q, k, v per layer of {num_heads * D}, {nkv * D}, {nkv * D} rows "
                         f"(nh = {num_heads}, nkv = {nkv}, even D = {D}); got {G} parts of {sizes}")
    if tokens_per_seq < 1 or M % tokens_per_seq or M // tokens_per_seq > Bc:
        raise ValueError(f"{M} rows are not whole sequences of {tokens_per_seq} tokens within cache batch {Bc}")
    if not 0 <= layer0 <= L - P:
        raise ValueError(f"layers {layer0}..{layer0 + P - 1} are outside the cache's {L} layers")
    if cos.shape != (M, D) or sin.shape != (M, D):
        raise ValueError(f"cos/sin must be [M, D] = {(M, D)}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if (q_norms is None) != (k_norms is None):
        raise ValueError("q_norms and k_norms must be given together")
    for name, ws in (("q_norms", q_norms), ("k_norms", k_norms)):
        if ws is not None:
            if len(ws) != P:
                raise ValueError(f"{name} must hold P = {P} tensors, got {len(ws)}")
            check_same_layout(list(ws), name)
            if tuple(ws[0].shape) != (D,):
                raise ValueError(f"{name} must be [D] = ({D},) each, got {tuple(ws[0].shape)}")
    if slot.numel() != 1 or slot.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot must be one integer element, got {tuple(slot.shape)} {slot.dtype}")
    return P, nkv, D


def qkv_rope_cache_reference(x, norm_weights, weights, biases, eps, cos, sin, q_norms, k_norms, qk_eps,
                             k_cache, v_cache, layer0, slot, tokens_per_seq, num_heads):
    """Torch reference and CPU fallback, with HF's numerics (each op rounds to the working dtype)."""
    P, nkv, D = _check_args(x, norm_weights, weights, biases, cos, sin, q_norms, k_norms, k_cache, v_cache,
                            layer0, slot, tokens_per_seq, num_heads)
    M, T, nh = x.shape[0], tokens_per_seq, num_heads
    B = M // T
    qkv = qkv_gemm_reference(x, norm_weights, weights, biases, eps).view(M, P, nh + 2 * nkv, D)
    q, k, v = qkv.split([nh, nkv, nkv], dim=2)
    if q_norms is not None:
        q = _rms_norm(q, torch.stack(list(q_norms))[None, :, None, :], qk_eps)
        k = _rms_norm(k, torch.stack(list(k_norms))[None, :, None, :], qk_eps)
    c, s = cos[:, None, None, :], sin[:, None, None, :]
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    pos = slot.reshape(1).long() + torch.arange(T, device=x.device)
    for j in range(P):
        k_cache[layer0 + j, :B].index_copy_(2, pos, k[:, j].reshape(B, T, nkv, D).transpose(1, 2).to(k_cache.dtype))
        v_cache[layer0 + j, :B].index_copy_(2, pos, v[:, j].reshape(B, T, nkv, D).transpose(1, 2).to(v_cache.dtype))
    return q.reshape(M, P * nh, D)


@triton.jit
def _round_bf16(x):
    # Round fp32 to the nearest bf16 value (ties to even), keeping fp32 storage: the interpreter's
    # fp32 -> bf16 cast truncates, and a value that is already a bf16 value casts exactly.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rope_cache_kernel(
    src_ptr, ss_ptr, b_ptr, b_off_ptr, cos_ptr, sin_ptr, qn_ptr, qn_off_ptr, kn_ptr, kn_off_ptr,
    q_ptr, kc_ptr, vc_ptr, slot_ptr,
    M, PN, SPLIT_STRIDE, SS_SPLIT_STRIDE, SPLITS, NH, NKV, HALF, T, LAYER0, inv_k, eps, qk_eps,
    stride_cm, stride_cd, stride_sm, stride_sd,
    stride_qm, stride_qh, stride_qd,
    stride_kl, stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vl, stride_vb, stride_vh, stride_vs, stride_vd,
    HAS_SS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_QKNORM: tl.constexpr, RNE_BF16: tl.constexpr,
    BH: tl.constexpr,
):
    m = tl.program_id(0)
    ph = tl.program_id(1)
    heads = NH + NKV
    j = ph // heads
    h = ph % heads
    D = 2 * HALF
    is_q = h < NH
    # q head h, or k head h - NH; layer j's columns are [q heads | k heads | v heads]
    col = j * (NH + 2 * NKV) * D + h * D
    offs = tl.arange(0, BH)
    hmask = offs < HALF
    row_off = m.to(tl.int64) * PN
    x1 = sum_splits(src_ptr + row_off + col + offs, SPLIT_STRIDE, SPLITS, hmask)
    x2 = sum_splits(src_ptr + row_off + col + HALF + offs, SPLIT_STRIDE, SPLITS, hmask)
    rstd = 1.0
    if HAS_SS:
        ss = tl.load(ss_ptr + m)
        for s in range(1, SPLITS):
            ss += tl.load(ss_ptr + s * SS_SPLIT_STRIDE + m)
        rstd = rsqrt_rn(ss * inv_k + eps)
        x1 = x1 * rstd
        x2 = x2 * rstd
    if HAS_BIAS:
        # layer j's q bias is part 3j, its k bias part 3j + 1, its v bias part 3j + 2
        bq = b_ptr + tl.load(b_off_ptr + 3 * j + (h >= NH).to(tl.int32)) + tl.where(is_q, h, h - NH) * D
        x1 += tl.load(bq + offs, mask=hmask, other=0.0).to(tl.float32)
        x2 += tl.load(bq + HALF + offs, mask=hmask, other=0.0).to(tl.float32)
    if HAS_QKNORM:
        r = rsqrt_rn(tl.div_rn(tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0), D * 1.0) + qk_eps)
        if is_q:
            wn = qn_ptr + tl.load(qn_off_ptr + j)
        else:
            wn = kn_ptr + tl.load(kn_off_ptr + j)
        w1 = tl.load(wn + offs, mask=hmask, other=0.0).to(tl.float32)
        w2 = tl.load(wn + HALF + offs, mask=hmask, other=0.0).to(tl.float32)
        x1 = x1 * r * w1
        x2 = x2 * r * w2
    c1 = tl.load(cos_ptr + m * stride_cm + offs * stride_cd, mask=hmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + m * stride_cm + (HALF + offs) * stride_cd, mask=hmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + m * stride_sm + offs * stride_sd, mask=hmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + m * stride_sm + (HALF + offs) * stride_sd, mask=hmask, other=0.0).to(tl.float32)
    # rotate_half(x) = [-x2, x1]
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    if RNE_BF16:
        o1 = _round_bf16(o1)
        o2 = _round_bf16(o2)
    if is_q:
        dst = q_ptr + m.to(tl.int64) * stride_qm + (j * NH + h).to(tl.int64) * stride_qh
        tl.store(dst + offs * stride_qd, o1.to(q_ptr.dtype.element_ty), mask=hmask)
        tl.store(dst + (HALF + offs) * stride_qd, o2.to(q_ptr.dtype.element_ty), mask=hmask)
    else:
        # 64-bit offsets throughout: (B-1) * nkv * S * D passes 2^31 at Llama-7B sizes (B*S ~ 512k)
        g = (h - NH).to(tl.int64)
        b = (m // T).to(tl.int64)
        pos = tl.load(slot_ptr).to(tl.int64) + m % T
        layer = (LAYER0 + j).to(tl.int64)
        kdst = kc_ptr + layer * stride_kl + b * stride_kb + g * stride_kh + pos * stride_ks
        tl.store(kdst + offs * stride_kd, o1.to(kc_ptr.dtype.element_ty), mask=hmask)
        tl.store(kdst + (HALF + offs) * stride_kd, o2.to(kc_ptr.dtype.element_ty), mask=hmask)
        # v: same reduction and bias, no norm, no rotation
        vcol = col + NKV * D
        v1 = sum_splits(src_ptr + row_off + vcol + offs, SPLIT_STRIDE, SPLITS, hmask) * rstd
        v2 = sum_splits(src_ptr + row_off + vcol + HALF + offs, SPLIT_STRIDE, SPLITS, hmask) * rstd
        if HAS_BIAS:
            bv = b_ptr + tl.load(b_off_ptr + 3 * j + 2) + g * D
            v1 += tl.load(bv + offs, mask=hmask, other=0.0).to(tl.float32)
            v2 += tl.load(bv + HALF + offs, mask=hmask, other=0.0).to(tl.float32)
        if RNE_BF16:
            v1 = _round_bf16(v1)
            v2 = _round_bf16(v2)
        vdst = vc_ptr + layer * stride_vl + b * stride_vb + g * stride_vh + pos * stride_vs
        tl.store(vdst + offs * stride_vd, v1.to(vc_ptr.dtype.element_ty), mask=hmask)
        tl.store(vdst + (HALF + offs) * stride_vd, v2.to(vc_ptr.dtype.element_ty), mask=hmask)


def qkv_rope_cache_triton(x, norm_weights, weights, biases, eps, cos, sin, q_norms, k_norms, qk_eps,
                          k_cache, v_cache, layer0, slot, tokens_per_seq, num_heads, *, out=None, split_k=None):
    """Launch the GEMM and the RoPE/cache kernel. ``out`` (optional, [M, P*nh, D] contiguous,
    x.dtype) receives q; ``split_k`` overrides the GEMM's heuristic."""
    P, nkv, D = _check_args(x, norm_weights, weights, biases, cos, sin, q_norms, k_norms, k_cache, v_cache,
                            layer0, slot, tokens_per_seq, num_heads)
    M, K = x.shape
    nh = num_heads
    PN = P * (nh + 2 * nkv) * D
    if out is None:
        out = torch.empty((M, P * nh, D), device=x.device, dtype=x.dtype)
    elif out.shape != (M, P * nh, D) or out.dtype != x.dtype:
        raise ValueError(f"out must be {(M, P * nh, D)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    # One split: the GEMM applies rstd and bias itself and leaves fp32 rows for the second kernel.
    # Several: this op's second kernel sums the partials (so no serial split-K in the GEMM).
    dest = workspace((M, PN), x)
    splits, ws, ss = qkv_gemm_launch(x, norm_weights, weights, biases, eps, dest, split_k)
    src = ws if splits > 1 else dest
    has_ss = splits > 1 and norm_weights is not None
    has_bias = splits > 1 and biases is not None
    has_qk = q_norms is not None
    any_bf16 = torch.bfloat16 in (out.dtype, k_cache.dtype, v_cache.dtype)
    BH = next_pow2(D // 2)
    dummy = src  # pointer arguments of absent inputs (never read: their HAS_* constexpr is off)
    bt = weight_table(biases) if has_bias else None
    qnt = weight_table(q_norms) if has_qk else None
    knt = weight_table(k_norms) if has_qk else None
    _rope_cache_kernel[(M, P * (nh + nkv))](
        src, ss if has_ss else dummy, bt.base if has_bias else dummy, bt.offsets if has_bias else slot,
        cos, sin, qnt.base if has_qk else dummy, qnt.offsets if has_qk else slot,
        knt.base if has_qk else dummy, knt.offsets if has_qk else slot,
        out, k_cache, v_cache, slot,
        M, PN, M * PN, ss.stride(0) if has_ss else 0, splits, nh, nkv, D // 2, tokens_per_seq, layer0, 1.0 / K,
        float(eps), float(qk_eps),
        *cos.stride(), *sin.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(),
        HAS_SS=has_ss, HAS_BIAS=has_bias, HAS_QKNORM=has_qk, RNE_BF16=any_bf16 and interpreted(x),
        BH=BH, num_warps=1 if BH <= 32 else 2,
    )
    return out


@torch.library.custom_op("cqil::qkv_rope_cache", mutates_args=("k_cache", "v_cache"))
def _qkv_rope_cache_op(x: torch.Tensor, norm_weights: list[torch.Tensor], weights: list[torch.Tensor],
                       biases: list[torch.Tensor], eps: float, cos: torch.Tensor, sin: torch.Tensor,
                       q_norms: list[torch.Tensor], k_norms: list[torch.Tensor], qk_eps: float,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, layer0: int, slot: torch.Tensor,
                       tokens_per_seq: int, num_heads: int) -> torch.Tensor:
    norm_weights, biases, q_norms, k_norms = (from_op_list(v) for v in (norm_weights, biases, q_norms, k_norms))
    args = (x, norm_weights, weights, biases, eps, cos, sin, q_norms, k_norms, qk_eps, k_cache, v_cache, layer0,
            slot, tokens_per_seq, num_heads)
    if use_triton(x):
        return qkv_rope_cache_triton(*args)
    return qkv_rope_cache_reference(*args)


@_qkv_rope_cache_op.register_fake
def _(x, norm_weights, weights, biases, eps, cos, sin, q_norms, k_norms, qk_eps, k_cache, v_cache, layer0, slot,
      tokens_per_seq, num_heads):
    D = k_cache.shape[-1]
    P = len(weights) // 3
    return x.new_empty((x.shape[0], P * num_heads, D))


def qkv_rope_cache(x: torch.Tensor, norm_weights: Sequence[torch.Tensor] | None, weights: Sequence[torch.Tensor],
                   biases: Sequence[torch.Tensor] | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                   q_norms: Sequence[torch.Tensor] | None, k_norms: Sequence[torch.Tensor] | None, qk_eps: float,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, layer0: int, slot: torch.Tensor,
                   tokens_per_seq: int, num_heads: int) -> torch.Tensor:
    """Group QKV projection, q/k norm, RoPE and KV-cache write for T new tokens per sequence.

    Args:
        x: [M, H] residual stream, M = B * T (sequence-major: row m is token m % T of sequence m // T).
        norm_weights: P tensors [H], the input-RMSNorm weights (or None), as in ``qkv_gemm``.
        weights: 3P tensors, layer-major q [nh*D, H], k [nkv*D, H], v [nkv*D, H] of each layer;
            biases: 3P tensors (q, k, v biases) or None.
        eps: input-RMSNorm epsilon.
        cos, sin: [M, D] rotary tables of each row's position (``rotate_half`` convention).
        q_norms, k_norms: P tensors [D] each, the per-head RMSNorm weights (Qwen3), or both None;
            qk_eps their epsilon.
        k_cache, v_cache: [L, B_cache, nkv, S, D]; written at layers layer0..layer0+P-1, batch rows
            0..B-1, slots slot[0] .. slot[0] + T - 1 (mutated in place).
        slot: int tensor with one element, on x's device (read on the device: graph-safe).
        tokens_per_seq: T; num_heads: nh (query heads per layer).

    Returns:
        q: [M, P * nh, D] in x.dtype, rotated, the P layers' heads in layer order.

    Example:
        >>> q = qkv_rope_cache(h, norms, qkv_weights, None, 1e-5, cos, sin, None, None, 0.0,
        ...                    k_cache, v_cache, 12, slot, 1, 32)   # layers 12.., one decode token
    """
    return _qkv_rope_cache_op(x, as_op_list(norm_weights), list(weights), as_op_list(biases), eps, cos, sin,
                              as_op_list(q_norms), as_op_list(k_norms), qk_eps, k_cache, v_cache, layer0, slot, tokens_per_seq, num_heads)
