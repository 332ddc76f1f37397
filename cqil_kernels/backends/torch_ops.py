"""The torch op set: the references that sit beside every fused kernel, run as they are."""

from __future__ import annotations

from .base import OpSet, csrc_decode_attention, prepare_csrc

__all__ = ["TorchOps"]


class TorchOps(OpSet):
    """Torch references for every op (any device; the CPU fallback and the oracle).

    Its transformers-mask ``decode_attention`` returns None (the group runs the model's own
    attention function); the engine's cached attention is the reference, or the compiled kernel
    with ``attention="csrc"``.
    """

    def __init__(self, name: str = "torch", attention: str = "default"):
        super().__init__(name)
        self.attention = attention

    def qkv_gemm(self, x, norm_weights, weights, biases, eps):
        from ..ops import qkv_gemm_reference

        return qkv_gemm_reference(x, norm_weights, weights, biases, eps)

    def qkv_rope_cache(self, x, norm_weights, weights, biases, eps, cos, sin, q_norms, k_norms, qk_eps,
                       k_cache, v_cache, layer0, slot, tokens_per_seq, num_heads):
        from ..ops import qkv_rope_cache_reference

        return qkv_rope_cache_reference(x, norm_weights, weights, biases, eps, cos, sin, q_norms, k_norms, qk_eps,
                                        k_cache, v_cache, layer0, slot, tokens_per_seq, num_heads)

    def batched_gemm(self, x, weights, biases=None):
        from ..ops import batched_gemm_reference

        return batched_gemm_reference(x, weights, biases)

    def gate_up_silu(self, u, norm_weights, gate_weights, up_weights, eps, residual=None, bypass=0, context=0):
        from ..ops import gate_up_silu_reference

        return gate_up_silu_reference(u, norm_weights, gate_weights, up_weights, eps, residual, bypass, context)

    def down_sum(self, m, weights, residual, attn=None):
        from ..ops import down_sum_reference

        return down_sum_reference(m, weights, residual, attn)

    def cached_decode_attention(self, q, k_caches, v_caches, kv_mask, kv_len, scale, last_pos=None):
        if self.attention == "csrc":
            return csrc_decode_attention(q, k_caches, v_caches, kv_mask, kv_len, scale, last_pos)
        from ..ops import decode_attention_reference

        return decode_attention_reference(q, k_caches, v_caches, kv_mask, kv_len, scale, last_pos)

    def decode_attention(self, q, keys, values, attention_mask, sliding_window, scale):
        if self.attention == "csrc":
            return super().decode_attention(q, keys, values, attention_mask, sliding_window, scale)
        return None  # the group uses the model's own attention function

    def prepare(self, device) -> None:
        if self.attention == "csrc":
            prepare_csrc(device)
