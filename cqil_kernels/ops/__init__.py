"""Fused CQIL group kernels (Triton), each with its torch reference beside it.

Every public op dispatches at call time: the Triton kernel when the tensors are on CUDA, or on
the CPU when ``TRITON_INTERPRET=1`` (set before this package was imported); the torch reference
otherwise, and for GEMMs of more than ``LaunchConfig.prefill_m`` rows on a GPU (cuBLAS). Launch
decisions (tiles, split-K, ...) are read from ``cqil_kernels.launch_config`` when an op launches.
Each op is also registered as a ``torch.ops.cqil.<name>`` custom op with a fake implementation,
so ``torch.compile(fullgraph=True)`` and CUDA-graph capture see one opaque node.

Importing this package imports Triton when it is installed (the kernels are defined at module
level, beside their references); ``import cqil_kernels`` alone does not import it.
"""

from ._triton import triton_usable
from .batched_gemm import batched_gemm, batched_gemm_reference
from .decode_attention import decode_attention, decode_attention_reference
from .down_sum import down_sum, down_sum_reference
from .gate_up import gate_up_silu, gate_up_silu_reference
from .qkv_gemm import qkv_gemm, qkv_gemm_reference
from .qkv_rope_cache import qkv_rope_cache, qkv_rope_cache_reference

__all__ = [
    "triton_usable",
    "qkv_gemm",
    "qkv_gemm_reference",
    "qkv_rope_cache",
    "qkv_rope_cache_reference",
    "batched_gemm",
    "batched_gemm_reference",
    "gate_up_silu",
    "gate_up_silu_reference",
    "down_sum",
    "down_sum_reference",
    "decode_attention",
    "decode_attention_reference",
]
