"""The Triton op set: fused kernels for the grouped GEMMs and split-KV decode attention.

Prefill attention goes through the model's own attention function (SDPA/flash), which handles
every mask form transformers produces; decode attention runs the group's P*nh heads in one
kernel when the mask is one this adapter understands, and falls back otherwise.

Prefill-sized GEMMs (more than ``PREFILL_M`` rows) on a GPU go to the torch references, i.e.
cuBLAS: there the GEMMs are compute-bound, cuBLAS is the stronger kernel and the fusions save
little, and the issue's prefill target is parity with the unconverted model, which uses cuBLAS.
Decode-sized GEMMs, where the fusions and split-K pay, run the Triton kernels. Under the
interpreter (CPU tests) every size runs the kernels. Set ``PREFILL_M = None`` to always use them
(``benchmarks/bench_kernels.py`` times both at prefill sizes).
"""

from __future__ import annotations

import torch

from ..ops import (
    batched_gemm as _batched_gemm,
    batched_gemm_reference,
    down_sum as _down_sum,
    down_sum_reference,
    gate_up_silu as _gate_up_silu,
    gate_up_silu_reference,
    qkv_gemm as _qkv_gemm,
    qkv_gemm_reference,
    qkv_rope_cache,  # noqa: F401  (decode only: always the kernels)
)
from ..ops import decode_attention as _decode_attention
from .torch_ops import rms_norm  # noqa: F401  (Qwen3 q/k norm: tiny, stays in torch)

PREFILL_M: int | None = 64


def _to_cublas(t: torch.Tensor, rows: int) -> bool:
    return PREFILL_M is not None and t.is_cuda and rows > PREFILL_M


def qkv_gemm(x, norm_weights, weights, biases, eps):
    """``ops.qkv_gemm``; x [M, H] (cuBLAS reference when M > PREFILL_M on a GPU)."""
    fn = qkv_gemm_reference if _to_cublas(x, x.shape[0]) else _qkv_gemm
    return fn(x, norm_weights, weights, biases, eps)


def batched_gemm(x, weights, biases=None):
    """``ops.batched_gemm``; x [P, M, K]."""
    fn = batched_gemm_reference if _to_cublas(x, x.shape[1]) else _batched_gemm
    return fn(x, weights, biases)


def gate_up_silu(u, norm_weights, gate_weights, up_weights, eps, residual=None, bypass=0, context=0):
    """``ops.gate_up_silu``; u [C + P, M, H]."""
    fn = gate_up_silu_reference if _to_cublas(u, u.shape[1]) else _gate_up_silu
    return fn(u, norm_weights, gate_weights, up_weights, eps, residual, bypass, context)


def down_sum(m, weights, residual, attn=None):
    """``ops.down_sum``; m [P, M, I]."""
    fn = down_sum_reference if _to_cublas(m, m.shape[1]) else _down_sum
    return fn(m, weights, residual, attn)


def kv_mask_from_hf(attention_mask, kv_len: int, batch: int):
    """The [B, S] keep-mask of one decode step from transformers' mask, or False if unsupported.

    Handles: None (every cached position is valid), 4D bool [B, 1, 1, S] (True = attend) and 4D
    additive float [B, 1, 1, S] (0 = attend). Anything else (BlockMask, 2D padding masks of flash
    attention, mismatched lengths) returns False and the caller uses the model's attention.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return False
    if attention_mask.shape[-1] != kv_len or attention_mask.shape[0] not in (1, batch) or attention_mask.shape[1] != 1:
        return False
    row = attention_mask[:, 0, -1, :]
    keep = row if row.dtype == torch.bool else row == 0
    return keep.expand(batch, kv_len)


def decode_attention(q, keys, values, attention_mask, sliding_window, scale):
    """q [B, P*nh, 1, D], keys/values: P caches [B, nkv, S, D] -> [B, P*nh, D], or None to fall back."""
    B, _, T, _ = q.shape
    S = keys[0].shape[2]
    if T != 1 or (sliding_window is not None and S > sliding_window):
        return None  # the window is applied by transformers' mask/attention; keep it there
    keep = kv_mask_from_hf(attention_mask, S, B)
    if keep is False:
        return None
    return _decode_attention(q[:, :, 0], keys, values, keep, S, scale)
