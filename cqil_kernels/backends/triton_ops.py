"""The Triton op set: fused kernels for the grouped GEMMs and split-KV decode attention.

Prefill attention goes through the model's own attention function (SDPA/flash), which handles
every mask form transformers produces; decode attention runs the group's P*nh heads in one
kernel when the mask is one the op set understands, and falls back otherwise.

Prefill-sized GEMMs (more than ``LaunchConfig.prefill_m`` rows) on a GPU run the torch references,
i.e. cuBLAS: there the GEMMs are compute-bound, cuBLAS is the stronger kernel and the fusions save
little, and the prefill target is parity with the unconverted model, which uses cuBLAS. Decode-sized
GEMMs, where the fusions and split-K pay, run the Triton kernels. The ops themselves decide this
when they launch (inside their custom ops, so ``torch.compile`` traces nothing of it); under the
interpreter (CPU tests) every size runs the kernels. ``use_launch_config(prefill_m=None)`` always
uses them (``benchmarks/bench_kernels.py`` times both at prefill sizes).
"""

from __future__ import annotations

import torch

from ..ops import batched_gemm as _batched_gemm
from ..ops import decode_attention as _decode_attention
from ..ops import down_sum as _down_sum
from ..ops import gate_up_silu as _gate_up_silu
from ..ops import qkv_gemm as _qkv_gemm
from ..ops import qkv_rope_cache as _qkv_rope_cache
from .base import OpSet, csrc_decode_attention, kv_mask_from_hf, prepare_csrc  # noqa: F401  (kv_mask_from_hf re-exported)

__all__ = ["TritonOps"]


class TritonOps(OpSet):
    """Fused Triton kernels (CUDA natively; CPU under ``TRITON_INTERPRET=1``); prefill-sized GEMMs
    on a GPU go to cuBLAS. ``attention="csrc"``: the compiled CUDA decode attention instead of the
    Triton one."""

    def __init__(self, name: str = "triton", attention: str = "default"):
        super().__init__(name)
        self.attention = attention

    def qkv_gemm(self, x, norm_weights, weights, biases, eps):
        """``ops.qkv_gemm``; x [M, H] (cuBLAS reference when M > prefill_m on a GPU)."""
        return _qkv_gemm(x, norm_weights, weights, biases, eps)

    def qkv_rope_cache(self, x, norm_weights, weights, biases, eps, cos, sin, q_norms, k_norms, qk_eps,
                       k_cache, v_cache, layer0, slot, tokens_per_seq, num_heads):
        """``ops.qkv_rope_cache`` (decode only: always the kernels)."""
        return _qkv_rope_cache(x, norm_weights, weights, biases, eps, cos, sin, q_norms, k_norms, qk_eps,
                               k_cache, v_cache, layer0, slot, tokens_per_seq, num_heads)

    def batched_gemm(self, x, weights, biases=None):
        """``ops.batched_gemm``; x [P, M, K]."""
        return _batched_gemm(x, weights, biases)

    def gate_up_silu(self, u, norm_weights, gate_weights, up_weights, eps, residual=None, bypass=0, context=0):
        """``ops.gate_up_silu``; u [C + P, M, H]."""
        return _gate_up_silu(u, norm_weights, gate_weights, up_weights, eps, residual, bypass, context)

    def down_sum(self, m, weights, residual, attn=None):
        """``ops.down_sum``; m [P, M, I]."""
        return _down_sum(m, weights, residual, attn)

    def cached_decode_attention(self, q, k_caches, v_caches, kv_mask, kv_len, scale, last_pos=None):
        """q [B, P*nh, D] over P caches [B, nkv, S, D] -> [B, P*nh, D] (split-KV kernel; the
        splits read only the slots up to ``last_pos``)."""
        if self.attention == "csrc":
            return csrc_decode_attention(q, k_caches, v_caches, kv_mask, kv_len, scale, last_pos)
        return _decode_attention(q, k_caches, v_caches, kv_mask, kv_len, scale, last_pos)

    def prepare(self, device) -> None:
        """The serial split-K arrival counters (and the compiled op), before any graph capture."""
        device = torch.device(device)
        if device.type == "cuda":
            from ..ops._splitk import reserve_tile_counters

            reserve_tile_counters(device)
        if self.attention == "csrc":
            prepare_csrc(device)
