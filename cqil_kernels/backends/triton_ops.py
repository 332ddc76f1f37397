"""The Triton op set: fused kernels for the grouped GEMMs and split-KV decode attention.

Prefill attention goes through the model's own attention function (SDPA/flash), which handles
every mask form transformers produces; decode attention runs the group's P*nh heads in one
kernel when the mask is one this adapter understands, and falls back otherwise.
"""

from __future__ import annotations

import torch

from ..ops import batched_gemm, down_sum, gate_up_silu, qkv_gemm, qkv_rope_cache  # noqa: F401
from ..ops import decode_attention as _decode_attention
from .torch_ops import rms_norm  # noqa: F401  (Qwen3 q/k norm: tiny, stays in torch)


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
