"""The torch op set: the references that sit beside every fused kernel, run as they are."""

from __future__ import annotations

import torch

from ..ops import (  # noqa: F401  (re-exported as this backend's op set)
    batched_gemm_reference as batched_gemm,
    down_sum_reference as down_sum,
    gate_up_silu_reference as gate_up_silu,
    qkv_gemm_reference as qkv_gemm,
    qkv_rope_cache_reference as qkv_rope_cache,
)

decode_attention = None  # the group uses the model's own attention function


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] normalised over D, times a broadcastable weight [..., D] (HF RMSNorm numerics)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
